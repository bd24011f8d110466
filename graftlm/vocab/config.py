"""The `vocab:` recipe section (see graftlm/vocab/)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from graftlm.config import Section


class VocabConfig(Section):
    source: str | None = None
    """The target-language source the new tokenizer is trained on (its curated text when curation ran). Default:
    of the sources in the recipe's target language, the one with the largest mixture weight (the first on a
    tie)."""
    new_tokens: int = Field(default=8000, ge=1, le=1_000_000)
    """At most this many tokens are added (most frequent first); fewer when the target text has fewer to offer."""
    init: Literal["mean", "subword-mean", "weighted", "random"] = "subword-mean"
    """New embedding rows: `mean` of all base rows; `subword-mean` of the rows of the base tokens the new token
    used to be split into (FVT); `weighted`, a similarity-weighted combination of base rows (FOCUS-like, see
    graftlm/vocab/init.py); `random`, drawn as the architecture initialises a fresh row (the baseline)."""
    ascii_tokens: bool = False
    """Also add tokens made only of ASCII letters (Vietnamese `trong`, `khi`; but also English words and names
    the target text shares). Off: English, code and numbers keep exactly the base's token ids."""
    pad_to_multiple_of: int = Field(default=64, ge=1)
    """Embedding rows are padded to a multiple of this (fast matrix shapes); padding rows are never produced."""
    train_bytes: int = Field(default=100_000_000, ge=1)
    """The tokenizer is trained on at most this many bytes of the target text."""
    min_frequency: int = Field(default=3, ge=1)
    """A pair of tokens seen fewer times than this in the training text is never merged."""
    seed: int = 0
    """Seeds the `random` rows and the `weighted` similarity vectors."""
    compare_inits: bool = True
    """Also score the extended model under every init, before any training, on each `eval.text` set (bits per byte,
    beside the unextended base): in stats.json and the report. Costs about one evaluation per init."""
