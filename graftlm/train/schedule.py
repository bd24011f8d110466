"""Learning-rate schedules made for continued pre-training (Ibrahim et al. 2024, "Simple and Scalable Strategies
to Continually Pre-train LLMs"). Each is a pure function of the step that returns a multiplier of the peak lr.

- cosine:   linear re-warming from 0 to the peak, then cosine re-decay to `min_lr_ratio`.
- wsd:      warmup-stable-decay: warmup, a constant plateau, then a decay over the last `decay_fraction` of the
            steps with a chosen shape (linear, cosine, or 1-sqrt).
- constant: warmup, then the peak until the end.
- infinite: warmup, a cosine cooldown to `constant_ratio`, a constant phase that can run as long as data keeps
            coming, and an optional final annealing to `min_lr_ratio` over the last `anneal_fraction` of the steps.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from graftlm.config import Section


class ScheduleConfig(Section):
    name: Literal["cosine", "wsd", "constant", "infinite"] = "cosine"
    warmup_steps: int | None = Field(default=None, ge=0)
    """Steps of linear warmup; when unset, `warmup_fraction` of the total steps."""
    warmup_fraction: float = Field(default=0.05, ge=0, le=1)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Where the decay ends, as a fraction of the peak lr."""
    decay_fraction: float = Field(default=0.2, ge=0, le=1)
    """wsd: the share of the steps spent decaying at the end."""
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"
    """wsd: linear, cosine or 1-sqrt (Hägele et al. 2024) decay."""
    cooldown_fraction: float = Field(default=0.2, ge=0, le=1)
    """infinite: the share of the steps spent cooling down from the peak to `constant_ratio`."""
    constant_ratio: float = Field(default=0.5, ge=0, le=1)
    """infinite: the constant lr, as a fraction of the peak."""
    anneal_fraction: float = Field(default=0.0, ge=0, le=1)
    """infinite: the share of the steps, at the end, spent annealing to `min_lr_ratio` (0: no annealing)."""

    @model_validator(mode="after")
    def _phases_fit(self) -> "ScheduleConfig":
        if self.name == "infinite" and self.warmup_fraction + self.cooldown_fraction + self.anneal_fraction > 1:
            raise ValueError("warmup_fraction + cooldown_fraction + anneal_fraction must not exceed 1")
        if self.name == "wsd" and self.warmup_fraction + self.decay_fraction > 1:
            raise ValueError("warmup_fraction + decay_fraction must not exceed 1")
        return self

    def warmup(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return round(self.warmup_fraction * total_steps)


def lr_multiplier(step: int, total_steps: int, config: ScheduleConfig) -> float:
    """The multiplier of the peak lr for the optimizer update of `step` (0-based) in a run of `total_steps`."""
    warmup = config.warmup(total_steps)
    if step < warmup:
        return (step + 1) / warmup
    return {"cosine": _cosine, "wsd": _wsd, "constant": lambda *_: 1.0, "infinite": _infinite}[config.name](
        step, total_steps, warmup, config)


def _progress(step: int, start: int, length: int) -> float:
    """How far `step` is into a phase of `length` steps that starts at `start`: 0 at its first step, 1 at its last."""
    return 1.0 if length <= 1 else min(max((step - start) / (length - 1), 0.0), 1.0)


def _cosine_between(high: float, low: float, t: float) -> float:
    return low + (high - low) * 0.5 * (1 + math.cos(math.pi * t))


def _cosine(step: int, total: int, warmup: int, c: ScheduleConfig) -> float:
    return _cosine_between(1.0, c.min_lr_ratio, _progress(step, warmup, total - warmup))


def _wsd(step: int, total: int, warmup: int, c: ScheduleConfig) -> float:
    decay = round(c.decay_fraction * total)
    start = total - decay
    if step < start:
        return 1.0
    t = _progress(step, start, decay)
    low = c.min_lr_ratio
    if c.decay_shape == "cosine":
        return _cosine_between(1.0, low, t)
    shape = t if c.decay_shape == "linear" else math.sqrt(t)
    return 1.0 - (1.0 - low) * shape


def _infinite(step: int, total: int, warmup: int, c: ScheduleConfig) -> float:
    cooldown = round(c.cooldown_fraction * total)
    anneal = round(c.anneal_fraction * total)
    if step < warmup + cooldown:
        return _cosine_between(1.0, c.constant_ratio, _progress(step, warmup, cooldown))
    anneal_start = total - anneal
    if anneal == 0 or step < anneal_start:
        return c.constant_ratio
    return c.constant_ratio + (c.min_lr_ratio - c.constant_ratio) * _progress(step, anneal_start, anneal)
