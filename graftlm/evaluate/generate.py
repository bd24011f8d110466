"""Generations: greedy continuations of the first words of held-out sentences, and the language they are written in.

From each language's prompt file (one sentence a line: .txt, .tsv or .jsonl) `n` lines are sampled (seeded), each
cut to its first `prompt_words` words (at most half of the sentence; characters for a sentence without spaces, as
Chinese is written), and continued greedily for `max_new_tokens` tokens. The curation stage's language identifier
(graftlm/curate/langid.py, py3langid by default) names the language of each continuation and of each of its
sentences. Per language:

- same_language: the share of continuations in the prompt's language;
- mixed: the share that switch language mid-way: their sentences (cut at sentence-final punctuation and line
  breaks; those with at least MIN_LETTERS letters) are in more than one language;
- distinct_1, distinct_2: distinct token uni- and bigrams over all of a continuation's, averaged over the
  continuations (1.0: no repetition; a model stuck in a loop goes towards 0);
- languages: how many continuations are in each language (`und`: too short to tell);
- samples: every prompt with its continuation and languages, for reading.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from graftlm.data.config import SourceConfig
from graftlm.data.read import read_records
from graftlm.errors import DataError
from graftlm.evaluate.config import GenerateConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MAX_SENTENCE_CHARS = 2000
"""A longer line is not one sentence: the file is probably a corpus of documents, not a prompt file."""
MIN_LETTERS = 12
"""Text with fewer letters is too short for a language identifier to be trusted: its language is `und`."""
UNKNOWN = "und"
SENTENCE_END = re.compile(r"(?<=[.!?…;])\s+|(?<=[。！？；])|[\r\n]+")
"""Where a sentence ends: final punctuation before a space (scripts with spaces), the CJK full stops (scripts
without), or a line break."""


@dataclass(frozen=True)
class Prompt:
    line: int
    text: str
    ids: list[int]


@dataclass(frozen=True)
class PromptSet:
    lang: str
    path: str
    prompts: list[Prompt]


def load_prompts(lang: str, path: str, tokenizer: "PreTrainedTokenizerBase", config: GenerateConfig,
                 text_field: str = "text") -> PromptSet:
    """Read a prompt file, sample `config.n` of its lines (seeded, kept in file order) and cut each to its first
    words; a line that cannot be a sentence is an error naming the file and line."""
    source = SourceConfig(paths=[path], text_field=text_field, txt_documents="line")
    records = list(read_records(source))
    if not records:
        raise DataError(f"{path}: no sentences (every line is empty)")
    for record in records:
        _check_sentence(record.text, path, record.line)
    chosen = sorted(random.Random(config.seed).sample(range(len(records)), min(config.n, len(records))))
    prompts = []
    for index in chosen:
        text = prompt_of(records[index].text, config.prompt_words)
        prompts.append(Prompt(records[index].line, text, tokenizer(text, add_special_tokens=False)["input_ids"]))
    return PromptSet(lang, path, prompts)


def _check_sentence(text: str, path: str, line: int) -> None:
    if len(text) > MAX_SENTENCE_CHARS:
        raise DataError(f"{path}:{line}: {len(text):,} characters: not one sentence (a prompt file holds one "
                        f"sentence a line, at most {MAX_SENTENCE_CHARS:,} characters)")
    if len(text.split()) < 2 and sum(c.isalpha() for c in text) < MIN_LETTERS:
        raise DataError(f"{path}:{line}: {text.strip()!r} is too short to cut a prompt from (a prompt is the first "
                        f"words of a sentence: it needs two words, or {MIN_LETTERS} letters written without spaces)")


def _units(text: str) -> list[str]:
    """Words, or the characters of a sentence written without spaces."""
    words = text.split()
    return words if len(words) > 1 else [c for c in text if not c.isspace()]


def prompt_of(sentence: str, words: int) -> str:
    """The first `words` words of a sentence, at most half of them ("Hà Nội là thủ đô của Việt Nam ." -> "Hà Nội
    là thủ"); a sentence without spaces is cut by characters."""
    units = _units(sentence)
    keep = max(1, min(words, len(units) // 2))
    return (" " if len(sentence.split()) > 1 else "").join(units[:keep])


# ---- generating ------------------------------------------------------------------------------------------


def continuations(model: "PreTrainedModel", prompt_set: PromptSet, start_id: int, pad_id: int, eos_id: int | None,
                  max_new_tokens: int, batch_size: int = 16,
                  on_batch: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """The greedy continuation of each prompt (after the start token), as token ids, ending before EOS.

    Prompts of similar length are batched, left-padded and masked; the model's mode is restored afterwards. The
    model runs in its own precision: under autocast every weight would be cast again for every generated token.
    """
    import torch
    from transformers import GenerationConfig

    from graftlm.evaluate.scoring import eval_mode, precision

    settings = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                eos_token_id=eos_id, bos_token_id=start_id)
    prompts = [[start_id, *p.ids] for p in prompt_set.prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    results: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad(), eval_mode(model), precision("float32", device):
        for at in range(0, len(order), batch_size):
            rows = order[at:at + batch_size]
            width = max(len(prompts[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, i in enumerate(rows):
                input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                attention_mask[row, width - len(prompts[i]):] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=settings)
            for row, i in enumerate(rows):
                new = out[row, width:].tolist()
                results[i] = new[:new.index(eos_id)] if eos_id is not None and eos_id in new else new
            if on_batch is not None:
                on_batch(min(at + batch_size, len(order)), len(order))
    return results


# ---- measuring -------------------------------------------------------------------------------------------


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if s and s.strip()]


def distinct(ids: list[int], n: int) -> float | None:
    """Distinct n-grams over all n-grams of one sequence; None when it is shorter than n."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def language_rates(prompt_set: PromptSet, generated: list[list[int]], tokenizer: "PreTrainedTokenizerBase",
                   identify: Callable[[str], tuple[str, float]]) -> dict:
    """{"same_language", "mixed", "distinct_1", "distinct_2", "languages", "n", "samples"} of one language."""
    from graftlm.languages import normalize_language

    def language(text: str) -> str:
        return identify(text)[0] if sum(c.isalpha() for c in text) >= MIN_LETTERS else UNKNOWN

    lang = normalize_language(prompt_set.lang)
    samples = []
    for prompt, ids in zip(prompt_set.prompts, generated):
        # the token budget can end inside a character that byte-level tokens spell in pieces: drop that part
        text = tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
        per_sentence = [language(s) for s in sentences(text)]
        samples.append({"line": prompt.line, "prompt": prompt.text, "continuation": text, "language": language(text),
                        "sentence_languages": [code for code in per_sentence if code != UNKNOWN]})
    n = len(samples)
    return {
        "same_language": sum(s["language"] == lang for s in samples) / n,
        "mixed": sum(len(set(s["sentence_languages"])) > 1 for s in samples) / n,
        "distinct_1": _mean([distinct(ids, 1) for ids in generated]),
        "distinct_2": _mean([distinct(ids, 2) for ids in generated]),
        "languages": dict(Counter(s["language"] for s in samples).most_common()),
        "n": n,
        "samples": samples,
    }


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
