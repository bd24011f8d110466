"""The `vocab:` recipe section (see graftlm/vocab/)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

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
    replay_ratio: float = Field(default=4.0, ge=0)
    """Replay protection, whatever a token's characters: a candidate is added only when its share of the target
    text's words is at least this many times the share of the replay text's words whose tokens it would change
    (an unseen token made of characters the replay text uses counts one word: a sample cannot show it never
    occurs). Measured on up to `replay_bytes` of the replay sources (every source not in the target's language,
    its curated text when curation ran). Higher protects the replay language more; 0 switches the check off."""
    max_replay_change: float = Field(default=1e-4, ge=0, le=1)
    """And whatever it serves the target, a candidate is skipped when it would change the tokens of more than this
    share of the replay text's words (1e-4: one in 10,000), e.g. a piece both languages use often."""
    replay_bytes: int = Field(default=20_000_000, ge=1)
    """Replay text read for the check, shared equally by the replay sources."""
    untie: bool = False
    """Give the new tokens output rows of their own: a model whose output head is its input embeddings (tied, like
    SmolLM2) gets a separate head, saved with `tie_word_embeddings: false` (plain transformers loads it), whose new
    rows start by `output_init` while the input rows start by `init`; the two then train apart. The base rows of
    both start equal, so the base model's outputs are unchanged. Costs one more embedding-sized matrix of weights
    (and of optimizer state), not compute."""
    output_init: Literal["input", "mean", "first-piece"] = "input"
    """With `untie`, the new output rows: `input`, by the rule of `init` (the same start as tied, then trained
    apart); `mean`, the mean of the base's output rows: the new tokens start with about the average logit, taking
    almost no probability, so the base's distribution on text without them (English) is kept, at the cost of the
    target text at step 0; `first-piece`, the output row of the first base token the new token used to start with
    (its logit is that piece's: better on the target text at step 0, worse on English, where every new token that
    starts with an English piece competes with it). Measured on SmolLM2 + 8k Vietnamese tokens: README.md."""
    ascii_tokens: Any = Field(default=None, exclude=True)
    """Removed (see `replay_ratio`); kept only to say so."""
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


    @field_validator("ascii_tokens")
    @classmethod
    def _removed(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("removed: tokens are no longer kept out for being ASCII; the replay text is protected "
                             "by `vocab.replay_ratio` (how many times more a new token must serve the target text "
                             "than it changes the replay text) and `vocab.max_replay_change`")
        return None
