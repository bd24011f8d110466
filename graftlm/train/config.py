"""The `train:` recipe section."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from graftlm.config import Section
from graftlm.train.schedule import ScheduleConfig


class TrainConfig(Section):
    seq_len: int = Field(default=512, ge=8)
    batch_tokens: int = Field(default=8192, ge=8)
    """Tokens per optimizer step: `batch_tokens / seq_len` sequences, in micro-batches (gradient accumulation)."""
    micro_batch_size: int = Field(default=4, ge=1)
    """Sequences per forward pass; lower it to save memory, the result does not change."""
    max_tokens: int | None = Field(default=300_000, ge=1)
    """Training length in tokens (rounded up to whole steps); `max_steps` wins when both are set."""
    max_steps: int | None = Field(default=None, ge=1)
    lr: float = Field(default=3.0e-4, gt=0)
    """The peak learning rate."""
    schedule: ScheduleConfig = ScheduleConfig()
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16: autocast on CPU (AVX512-BF16/AMX) and CUDA with fp32 master weights; fp32: no autocast."""
    loss: Literal["chunked", "standard"] = "chunked"
    """chunked: the output layer and cross-entropy run a chunk of tokens at a time, never holding all logits;
    standard: the model's own logits, then cross-entropy."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    seed: int = 0
    checkpoint_every: int = Field(default=100, ge=0)
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    max_bad_steps: int = Field(default=5, ge=1)
    """A NaN or inf loss skips its update; this many in a row stop the run."""
    deterministic: bool = True
    """Deterministic kernels, so that a resumed run repeats an uninterrupted one bit for bit (on CPU)."""

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.batch_tokens % self.seq_len:
            raise ValueError(f"batch_tokens ({self.batch_tokens}) must be a multiple of seq_len ({self.seq_len})")
        if self.max_tokens is None and self.max_steps is None:
            raise ValueError("set max_tokens or max_steps")
        return self

    @property
    def sequences_per_step(self) -> int:
        return self.batch_tokens // self.seq_len

    @property
    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return math.ceil(self.max_tokens / self.batch_tokens)
