"""Recipe sections for the data: where each source's documents come from, how they are mixed and packed."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_serializer, model_validator

from graftlm.config import LanguageCode, RecipePath, Section


class SourceConfig(Section):
    """One named body of text: files or globs of .jsonl, .txt, .parquet or .tsv, optionally .gz or .zst."""

    paths: list[RecipePath] = Field(min_length=1)
    format: Literal["auto", "jsonl", "txt", "parquet", "tsv"] = "auto"
    text_field: str = "text"
    """The JSON key, parquet column or TSV column that holds the text."""
    txt_documents: Literal["file", "line", "paragraph"] = "line"
    """How a .txt file splits into documents: the whole file, each line, or blank-line separated paragraphs."""
    on_error: Literal["stop", "skip"] = "stop"
    """`stop`: a bad record ends the stage with its file and line; `skip`: it is skipped and counted."""
    lang: LanguageCode | None = None
    """The source's language: ISO 639-1 (`vi`, `sw`), ISO 639-3 (`swh`) or FineWeb2's `swh_Latn`, held as one
    canonical code (graftlm/languages.py). Curation and vocabulary extension take the language's settings by it."""
    max_documents: int | None = Field(default=None, ge=1)
    """Read at most this many documents (a quick way to subsample)."""


class MixtureConfig(Section):
    """Sampling weights per source (`vi: 0.75, en: 0.25`), written flat in the recipe beside `repeat`."""

    repeat: bool = True
    """When a source runs out, start a new (reshuffled) epoch of it; false stops training instead."""
    weights: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _gather_weights(cls, data: Any) -> Any:
        if isinstance(data, dict) and "weights" not in data:
            data = dict(data)
            weights = {k: data.pop(k) for k in list(data) if k != "repeat"}
            data["weights"] = weights
        return data

    @model_validator(mode="after")
    def _check_weights(self) -> "MixtureConfig":
        for name, weight in self.weights.items():
            if weight < 0:
                raise ValueError(f"weight of '{name}' must be >= 0, got {weight}")
        if self.weights and sum(self.weights.values()) <= 0:
            raise ValueError("the weights must not all be 0")
        return self

    @model_serializer(mode="wrap")
    def _flatten(self, handler):
        data = handler(self)
        return {**data.pop("weights"), **data}


class PackConfig(Section):
    """How tokenised text is laid out on disk."""

    shard_tokens: int = Field(default=100_000_000, ge=1024)
    """Tokens per memory-mapped shard file."""
    batch_bytes: int = Field(default=1 << 20, ge=1)
    """Text handed to the tokenizer at once; larger batches use the cores better."""
