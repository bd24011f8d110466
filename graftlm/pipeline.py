"""`graft run`: the stages of a recipe in order. Each reads the outputs of the ones before it from the run directory
and is skipped when its complete output is already there (graftlm/stage.py: the contract and the runner).

A new stage is a `Stage` subclass in its folder's stage.py and one line below, after the stages it needs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

from graftlm.base.stage import Base
from graftlm.checks import check_inputs
from graftlm.curate.stage import Curate
from graftlm.data.stage import Pack
from graftlm.merge.stage import Merge
from graftlm.plan.stage import Plan
from graftlm.report.stage import Report
from graftlm.runs import hold_run, remove_stale_tree
from graftlm.signals import stop_on_signals
from graftlm.stage import Stage, bring_up_to_date
from graftlm.train.stage import Train
from graftlm.vocab.stage import Vocab

if TYPE_CHECKING:
    from graftlm.recipe import Recipe
    from graftlm.runs import RunDir

STAGES: dict[str, type[Stage]] = {stage.name: stage for stage in (Base, Curate, Vocab, Pack, Plan, Train, Merge,
                                                                          Report)}
"""Every stage, dependencies first."""
PREPARE_STAGES = tuple(name for name, stage in STAGES.items() if stage.prepares_data)
"""What `graft prepare` runs: everything up to packed training data."""


def run_stages(recipe: "Recipe", run: "RunDir", stages: Sequence[str] = tuple(STAGES),
               options: dict[str, dict] | None = None, needs: bool = True) -> None:
    """Bring `stages` (and, with `needs`, the stages they need) up to date; `options[stage]` are that stage's
    keyword arguments (`fresh=True` for train). What can be checked before any work is checked first; then the run
    directory's lock is held (a second writer is refused) and SIGTERM, SIGUSR1, SIGINT stop the command cleanly
    (graftlm/signals.py)."""
    check_inputs(recipe)  # a missing file or a seq_len too long is said now, not after the base export
    with hold_run(run.root), stop_on_signals():  # the one writer of the run; a signal stops it cleanly
        if os.environ.get("RANK", "0") == "0":
            remove_stale_tree(run.root)  # what killed runs left half-written (*.tmp-PID: 517 MB each by default)
        bring_up_to_date(recipe, run, STAGES, stages, options, needs)
