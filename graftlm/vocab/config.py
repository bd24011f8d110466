"""The `vocab:` recipe section (see graftlm/vocab/)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from graftlm.config import Section

if TYPE_CHECKING:
    from graftlm.recipe import Recipe

BASE_LANGUAGE = "en"
"""The language the supported bases were mostly trained on; the default target source is one that is not it."""


class VocabConfig(Section):
    source: str | None = None
    """The target-language source the new tokenizer is trained on (its curated text when curation ran). Default:
    of the sources whose `lang` is set and not English, the one with the largest mixture weight (the first on a
    tie); when no source has such a `lang`, the source with the largest mixture weight."""
    new_tokens: int = Field(default=8000, ge=1, le=1_000_000)
    """At most this many tokens are added (most frequent first); fewer when the target text has fewer to offer."""
    init: Literal["mean", "subword-mean", "weighted", "random"] = "subword-mean"
    """New embedding rows: `mean` of all base rows; `subword-mean` of the rows of the base tokens the new token
    used to be split into (FVT); `weighted`, a similarity-weighted combination of base rows (FOCUS-like, see
    graftlm/vocab/init.py); `random`, drawn as the architecture initialises a fresh row (the baseline)."""
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


def target_source(recipe: "Recipe") -> str:
    """The name of the source the vocabulary is grown for (see `VocabConfig.source`)."""
    config = recipe.vocab or VocabConfig()
    if config.source is not None:
        return config.source
    weights = recipe.mixture_weights()
    names = list(recipe.sources)
    foreign = [n for n in names if recipe.sources[n].lang not in (None, BASE_LANGUAGE)]
    return max(foreign or names, key=lambda n: (weights.get(n, 0.0), -names.index(n)))
