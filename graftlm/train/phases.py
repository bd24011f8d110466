"""`train.phases`: training in phases, each with what it trains, its length, its peak lr and its own schedule.

Without phases there is one, `all`, over the whole run, with train.lr and train.schedule. Phases are a pure
function of the recipe, so a resumed run finds the phase of any step again.
"""

from __future__ import annotations

from dataclasses import dataclass

from graftlm.train.config import PhaseConfig, TrainConfig
from graftlm.train.schedule import ScheduleConfig, lr_multiplier


@dataclass(frozen=True)
class Phase:
    index: int
    start: int
    """Its first optimizer step (0-based)."""
    steps: int
    train: str
    """`embeddings`, `new_rows` or `all` (see PhaseConfig.train)."""
    lr: float
    schedule: ScheduleConfig

    def covers(self, step: int) -> bool:
        return self.start <= step < self.start + self.steps

    def lr_at(self, step: int) -> float:
        return self.lr * lr_multiplier(step - self.start, self.steps, self.schedule)


def plan_phases(cfg: TrainConfig) -> list[Phase]:
    phases, start = [], 0
    for index, (phase, steps) in enumerate(zip(cfg.phases or [PhaseConfig()], cfg.phase_steps())):
        phases.append(Phase(index, start, steps, phase.train, phase.lr or cfg.lr, phase.schedule or cfg.schedule))
        start += steps
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase of the update with 0-based index `step` (the last phase past the end)."""
    return next((p for p in phases if p.covers(step)), phases[-1])
