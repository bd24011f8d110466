"""The `report:` recipe section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from graftlm.config import Section

Tracker = Literal["tensorboard", "wandb", "trackio", "mlflow"]


class ReportConfig(Section):
    source_margin_bpb: float = Field(default=0.05, ge=0)
    """The largest rise in a source language's bits per byte that still counts as keeping it."""
    trackers: list[Tracker] = []
    """Experiment trackers that receive the same numbers as metrics.jsonl while training (loss, lr, grad norm,
    tokens/s, tokens per source, every evaluation) and the resolved recipe as the run's config. Each is an optional
    extra (`pip install 'graftlm[tensorboard]'`); they write under runs/<name>/trackers/, W&B offline and trackio
    locally unless their own environment variables (WANDB_MODE, TRACKIO_DIR, MLFLOW_TRACKING_URI) say otherwise."""

    @field_validator("trackers")
    @classmethod
    def _once_each(cls, trackers: list[str]) -> list[str]:
        if len(set(trackers)) != len(trackers):
            raise ValueError("a tracker is named twice")
        return trackers
