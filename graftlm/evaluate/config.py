"""The `eval:` recipe section: held-out text and multiple-choice sets per language, and when to evaluate them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from graftlm.config import LanguageCode, RecipePath, Section


class ChoiceSetConfig(Section):
    """A multiple-choice set: `{path: .., format: .., lang: ..}`, or just its path."""

    path: RecipePath
    format: Literal["auto", "xcopa", "generic"] = "auto"
    """`xcopa` (premise, choice1, choice2, question, label), `generic` (context, choices, label), or `auto`."""
    lang: LanguageCode | None = None
    """The set's language (XCOPA: that of its connectives, `vi`: "bởi vì"/"vì vậy"); detected from the premises
    when absent."""

    @model_validator(mode="before")
    @classmethod
    def _path_alone(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data


class EvalConfig(Section):
    text: dict[str, RecipePath] = {}
    """Held-out text per language (`vi: eval/vie.tsv`), scored in bits per byte: .txt (a document per line),
    .tsv (a `text` column) or .jsonl (`text_field`). A name that is a language code (`vi`, `zho_Hans`) says the
    set's language: fertility is counted per character for a language written without spaces, else per word."""
    text_field: str = "text"
    """The .jsonl field or .tsv column holding the text."""
    choice: dict[str, ChoiceSetConfig] = {}
    """Multiple-choice sets by name (`xcopa_vi: {path: eval/xcopa/vi/test.vi.jsonl, lang: vi}`), scored by accuracy."""
    every: int | None = Field(default=None, ge=1)
    """Optimizer steps between evaluations during training (besides before step 0 and at the end); null: only those."""
    max_documents: int | None = Field(default=100, ge=1)
    """During training, score only the first this many documents of each text set (null: all)."""
    max_items: int | None = Field(default=100, ge=1)
    """During training, score only the first this many items of each choice set (null: all)."""
    batch_size: int = Field(default=16, ge=1)
    """Sequences per forward pass."""
    max_length: int | None = Field(default=None, ge=8)
    """Context length in tokens; longer documents are scored in overlapping windows. Default: the model's own,
    capped at 2048."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """float32 agrees with a plain transformers computation; bfloat16 (autocast) is faster where bf16 is fast."""
