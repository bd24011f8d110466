"""The `train:` recipe section."""

from __future__ import annotations

from pydantic import Field

from graftlm.config import Section


class TrainConfig(Section):
    seq_len: int = Field(default=512, ge=8)
    batch_tokens: int = Field(default=8192, ge=8)
    """Tokens per optimizer step (gradient accumulation fills it)."""
    max_tokens: int | None = Field(default=300_000, ge=1)
    lr: float = Field(default=3.0e-4, gt=0)
    seed: int = 0
