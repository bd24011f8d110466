"""Bits per byte on held-out text: how well a model predicts a language, comparable across tokenizers.

bpb = (sum over a set's tokens of -log2 p(token | the tokens before it)) / (UTF-8 bytes of the text). Dividing by
bytes rather than tokens means a tokenizer that cuts text into more, cheaper pieces gains nothing. Each document is
scored on its own, starting from the BOS token (EOS where there is none), every one of its tokens counted; a
document longer than the context is cut into overlapping windows, each token scored once with at least
`max_length - stride` tokens of left context.

Fertility (tokens per word) is counted per whitespace-separated word where the set's language separates words by
spaces, and per character (whitespace not counted) where it does not (Chinese, Japanese, Thai, ...): a Chinese
sentence is one "word" between spaces, which would make any tokenizer look absurd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from graftlm.data.config import SourceConfig
from graftlm.data.read import read_documents
from graftlm.errors import DataError
from graftlm.evaluate.scoring import Span, log_likelihoods
from graftlm.languages import fertility_unit

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class TextSet:
    """Held-out documents, tokenised once (without the start token)."""

    path: str
    documents: list[list[int]]
    bytes: list[int]
    units: list[int]
    """Per document, the fertility units: whitespace-separated words, or characters (see `unit`)."""
    unit: str = "word"
    """`word` or `character`."""

    def head(self, count: int | None) -> "TextSet":
        """The first `count` documents (all when None)."""
        if count is None or count >= len(self.documents):
            return self
        return TextSet(self.path, self.documents[:count], self.bytes[:count], self.units[:count], self.unit)


def load_text_set(path: str, tokenizer: "PreTrainedTokenizerBase", text_field: str = "text",
                  max_documents: int | None = None, lang: str | None = None) -> TextSet:
    """Read a .txt (a document per line), .tsv (a `text_field` column) or .jsonl (`text_field`) file. `lang` (a
    language code, or a set name that may be one) decides whether fertility counts words or characters."""
    source = SourceConfig(paths=[path], text_field=text_field, txt_documents="line", max_documents=max_documents)
    texts = list(read_documents(source))
    if not texts:
        raise DataError(f"{path}: no documents (every line is empty)")
    documents = tokenizer(texts, add_special_tokens=False)["input_ids"]
    unit = fertility_unit(lang)
    units = [len(t.split()) if unit == "word" else sum(not c.isspace() for c in t) for t in texts]
    return TextSet(path, documents, [len(t.encode("utf-8")) for t in texts], units, unit)


def fertility(result: dict) -> tuple[float, str]:
    """(tokens per unit, unit) of a result that holds `tokens_per_word` or `tokens_per_character`."""
    unit = "character" if "tokens_per_character" in result else "word"
    return result[f"tokens_per_{unit}"], unit


def windows(ids: list[int], max_length: int, stride: int | None = None) -> list[Span]:
    """Cut a sequence (start token first) into spans of at most `max_length` tokens that score each token once.

    A window starts every `stride` tokens (default half the context) and scores the tokens the previous one did
    not reach, so every token after the first window has at least `max_length - stride` tokens before it.
    """
    if len(ids) <= max_length:
        return [Span(ids, 1)]
    stride = stride or max(1, max_length // 2)
    if not 0 < stride < max_length:
        raise ValueError(f"stride must be between 1 and max_length - 1, got {stride}")
    spans, begin, scored_to = [], 0, 1
    while True:
        end = min(begin + max_length, len(ids))
        spans.append(Span(ids[begin:end], scored_to - begin))
        if end == len(ids):
            return spans
        scored_to = end
        begin += stride


def bits_per_byte(model: "PreTrainedModel", text_set: TextSet, start_id: int, pad_id: int, max_length: int,
                  batch_size: int = 16, dtype: str = "float32",
                  on_batch: Callable[[int, int], None] | None = None) -> dict:
    """{"bpb", "tokens_per_byte", "tokens_per_word" (or "tokens_per_character"), "documents"} of a text set."""
    spans = [span for doc in text_set.documents for span in windows([start_id, *doc], max_length)]
    nats = -sum(log_likelihoods(model, spans, pad_id, batch_size, dtype, on_batch))
    tokens, size, units = sum(map(len, text_set.documents)), sum(text_set.bytes), sum(text_set.units)
    return {"bpb": nats / math.log(2) / size, "tokens_per_byte": tokens / size,
            f"tokens_per_{text_set.unit}": tokens / max(units, 1), "documents": len(text_set.documents)}

