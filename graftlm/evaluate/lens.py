"""The logit lens: what each layer would predict if it were the last, and in which language.

Every block's hidden state (layer 0: the embeddings; layer i: the output of block i) goes through the model's own
final norm and output head (nostalgebraist 2020; Wendler et al. 2024, "Do Llamas Work in English?"); the last
layer is the model's own output. Per layer, on held-out text of each language:

- bpb: bits per byte of the actual next tokens under the lens (the last layer's is the text's bits per byte, as
  eval.text computes it);
- shares: per language, the share of positions whose lens top-1 token belongs to that language (`target_share`
  and `english_share` pick the target language and English).

A token belongs to a language when it is frequent in that language's text and rare in the others' (see
`TokenLanguages`): counted in the packed training data of each source during a run (`token_languages_for_run`),
in the lens texts themselves in a standalone `graft eval`. Nothing here depends on the architecture beyond finding
the final norm (`norm`, `final_layernorm`, `ln_f`, ... of the decoder) and the output head
(`get_output_embeddings`); under a peft adapter the adapted model runs and its base model's norm and head apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from graftlm.errors import GraftError
from graftlm.evaluate.bpb import TextSet, windows
from graftlm.precision import eval_dtype

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from graftlm.recipe import Recipe
    from graftlm.runs import RunDir

RATIO = 2.0
"""A token belongs to a language when its frequency there is at least this many times its frequency in every
other language's text."""
MIN_COUNT = 2
"""... and it occurs there at least this many times (a token seen once says little)."""
UNSEEN = 0.5
"""The count a token unseen in a language's text stands in with when frequencies are compared."""
COUNTED_TOKENS = 20_000_000
"""At most this many tokens of each language's packed data are counted (the first ones)."""
NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm", "norm_f", "final_norm")
"""Where decoder stacks keep their final norm (Llama, Qwen, Mistral, Gemma: `norm`; Phi: `final_layernorm`;
GPT-2, Falcon: `ln_f`; OPT: `final_layer_norm`)."""


@dataclass(frozen=True)
class TokenLanguages:
    """The language each token id belongs to, or none (shared tokens: punctuation, digits, names, special)."""

    languages: tuple[str, ...]
    owner: np.ndarray
    """For each token id, the index of its language in `languages`, or -1."""
    origin: str = "token counts"
    """What was counted (shown in the results and the report)."""

    @classmethod
    def from_counts(cls, counts: dict[str, np.ndarray], vocab_size: int, exclude: Iterable[int] = (),
                    origin: str = "token counts") -> "TokenLanguages":
        """From token counts per language: a token belongs to language L when it occurs at least MIN_COUNT times in
        L's text and its frequency there (count / tokens of L) is at least RATIO times its frequency in each other
        language (an unseen token counted as UNSEEN)."""
        languages = tuple(counts)
        matrix = np.zeros((len(languages), vocab_size), dtype=np.float64)
        for row, lang in enumerate(languages):
            known = counts[lang][:vocab_size]
            matrix[row, :len(known)] = known
        totals = np.maximum(matrix.sum(axis=1, keepdims=True), 1.0)
        rates = np.maximum(matrix, UNSEEN) / totals
        owner = np.full(vocab_size, -1, dtype=np.int32)
        for row in range(len(languages)):
            others = np.delete(rates, row, axis=0)
            ratio_ok = (rates[row] >= RATIO * others.max(axis=0)) if len(others) else np.ones(vocab_size, bool)
            owner[(matrix[row] >= MIN_COUNT) & ratio_ok] = row
        owner[[i for i in exclude if 0 <= i < vocab_size]] = -1
        return cls(languages, owner, origin)

    @classmethod
    def from_documents(cls, documents: dict[str, list[list[int]]], vocab_size: int,
                       exclude: Iterable[int] = ()) -> "TokenLanguages":
        """From tokenised text per language (the lens texts of a standalone `graft eval`)."""
        counts = {lang: np.bincount(np.fromiter((t for doc in docs for t in doc), dtype=np.int64),
                                    minlength=vocab_size) for lang, docs in documents.items()}
        return cls.from_counts(counts, vocab_size, exclude, "the lens texts")

    @classmethod
    def from_packed(cls, folders: dict[str, list[str | Path]], vocab_size: int,
                    exclude: Iterable[int] = ()) -> "TokenLanguages":
        """From packed sources (`runs/<name>/packed/<source>/`, graftlm.data.pack), several per language allowed:
        the first COUNTED_TOKENS tokens of each language are counted."""
        from graftlm.data.pack import PackedSource

        counts = {}
        for lang, paths in folders.items():
            total, left = np.zeros(vocab_size, dtype=np.int64), COUNTED_TOKENS
            for path in paths:
                for shard in PackedSource.open(path).memmaps():
                    if left <= 0:
                        break
                    part = np.asarray(shard[:left])
                    total += np.bincount(part, minlength=vocab_size)[:vocab_size]
                    left -= len(part)
            counts[lang] = total
        return cls.from_counts(counts, vocab_size, exclude, "the packed training data")

    def share_counts(self, token_ids: "torch.Tensor") -> np.ndarray:
        """How many of `token_ids` belong to each language (in `languages` order); ids past the tokenizer's (the
        rows an output head is padded with) belong to none."""
        ids = token_ids.cpu().numpy()
        owners = self.owner[ids[ids < len(self.owner)]]
        return np.bincount(owners[owners >= 0], minlength=len(self.languages))


def token_languages_for_run(recipe: "Recipe", run: "RunDir", vocab_size: int,
                            exclude: Iterable[int] = ()) -> TokenLanguages | None:
    """Token languages from the run's packed data: every source with a `lang` whose packed folder is complete
    (runs/<name>/packed/<source>/manifest.json), grouped by language; None when fewer than one language is packed.
    `exclude`: the tokenizer's special ids (`tokenizer.all_special_ids`)."""
    from graftlm.languages import normalize_language

    folders: dict[str, list[Path]] = {}
    for name, source in recipe.sources.items():
        if source.lang and (run.packed / name / "manifest.json").is_file():
            folders.setdefault(normalize_language(source.lang), []).append(run.packed / name)
    return TokenLanguages.from_packed(folders, vocab_size, exclude) if folders else None


def final_norm_and_head(model: "PreTrainedModel") -> tuple["torch.nn.Module", "torch.nn.Module"]:
    """The final norm and the output head of a causal LM (or of the base model under a peft adapter)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, base.base_model_prefix, None)
    for name in NORM_NAMES:
        norm = getattr(decoder, name, None)
        if isinstance(norm, torch.nn.Module):
            return norm, head
    raise GraftError(f"eval.lens: cannot find the final norm of {type(base).__name__} (looked for "
                     f"{', '.join(NORM_NAMES)} on its decoder); the logit lens needs it")


def logit_lens(model: "PreTrainedModel", text_set: TextSet, token_languages: TokenLanguages, start_id: int,
               pad_id: int, max_length: int, batch_size: int = 16, dtype: str = "float32",
               on_batch: Callable[[int, int], None] | None = None) -> dict:
    """{"layers", "bpb", "shares": {lang: [...]}, "token_languages", "documents", "tokens"} of one text set: a
    value per layer (`token_languages`: what the token languages were counted in)."""
    import torch

    from graftlm.evaluate.scoring import batch_inputs, eval_mode, precision, span_batches, target_log_probs

    norm, head = final_norm_and_head(model)
    device = next(model.parameters()).device
    project = _projection(head, eval_dtype(dtype, device))
    spans = [span for doc in text_set.documents for span in windows([start_id, *doc], max_length)]
    nats: np.ndarray | None = None
    counts: np.ndarray | None = None
    done = 0
    order = sorted(range(len(spans)), key=lambda i: len(spans[i].ids), reverse=True)
    with torch.no_grad(), eval_mode(model), precision(dtype, device):
        for rows in span_batches(order, spans, batch_size):
            batch = batch_inputs([spans[i] for i in rows], pad_id, device)
            out = model(**batch.inputs, output_hidden_states=True)
            # hidden_states[0] is the embeddings, [i] block i's output; the last one has been through the final
            # norm already, so the last layer is the model's own logits. One layer's logits at a time: a batch's
            # logits for every layer at once would be gigabytes.
            hidden = out.hidden_states[:-1]
            layer_nats, layer_counts = [], []
            for i in range(len(hidden) + 1):
                logits = project(norm(hidden[i][:, :-1][batch.where])) if i < len(hidden) else \
                    out.logits[:, :-1][batch.where]
                layer_nats.append(-target_log_probs(logits, batch.targets).sum().item())
                layer_counts.append(token_languages.share_counts(logits.argmax(dim=-1)))
                del logits
            nats = np.array(layer_nats) if nats is None else nats + layer_nats
            counts = np.array(layer_counts) if counts is None else counts + layer_counts
            done += len(rows)
            if on_batch is not None:
                on_batch(done, len(spans))
    positions = sum(len(doc) for doc in text_set.documents)
    size = sum(text_set.bytes)
    return {"layers": list(range(len(nats))), "bpb": (nats / math.log(2) / size).tolist(),
            "shares": {lang: (counts[:, i] / positions).tolist() for i, lang in enumerate(token_languages.languages)},
            "token_languages": token_languages.origin, "documents": len(text_set.documents), "tokens": positions}


def _projection(head: "torch.nn.Module", dtype: str) -> Callable:
    """The output head as a function. Under bfloat16 a linear head's weight is cast once here: autocast would
    cast the whole vocabulary-by-hidden matrix again for every layer of every batch."""
    import torch
    import torch.nn.functional as F

    if dtype != "bfloat16" or not isinstance(head, torch.nn.Linear):
        return head
    weight = head.weight.to(torch.bfloat16)
    bias = None if head.bias is None else head.bias.to(torch.bfloat16)
    return lambda hidden: F.linear(hidden.to(torch.bfloat16), weight, bias)
