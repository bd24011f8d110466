"""The plan's steps in order: train the pilots, read their points, fit, choose, write the outputs.

Training a pilot is handed in (`train_pilot(recipe, run_dir)`), so that the stage runner decides how a pilot
shares the recipe's prepared data and skips a pilot already trained or resumes one interrupted; this module
only knows where each pilot's run directory is:

    <folder>/pilots/<pilot name>/     a run directory per pilot (metrics.jsonl, checkpoints/, ...)
    <folder>/plan.json, recipe.yaml, report.html
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from graftlm.plan.checks import fit_after_tokens
from graftlm.plan.choose import make_plan
from graftlm.plan.pilots import pilot_recipe, pilot_variants, read_points
from graftlm.plan.report import write_plan
from graftlm.progress import log
from graftlm.recipe import Recipe


def pilot_dir(folder: str | os.PathLike, name: str) -> Path:
    return Path(folder) / "pilots" / name


def run_plan(recipe: Recipe, folder: str | os.PathLike, train_pilot: Callable[[Recipe, Path], None],
             key: str | None = None) -> dict:
    """Train every pilot of `recipe.plan` with `train_pilot`, then fit, choose and write the plan into `folder`
    (plan.json holding `"fingerprint": key`, the plan stage's marker); returns plan.json's content."""
    pilots = pilot_variants(recipe)
    for i, pilot in enumerate(pilots):
        log(f"plan: pilot {i + 1}/{len(pilots)}: {pilot.name} ({pilot.tokens:,} tokens, mixture "
            f"{', '.join(f'{n} {w:g}' for n, w in pilot.weights.items())})")
        train_pilot(pilot_recipe(recipe, pilot), pilot_dir(folder, pilot.name))
    after = fit_after_tokens(recipe)
    fitted = [p for pilot in pilots if not pilot.validation for p in read_points(pilot_dir(folder, pilot.name), pilot)
              if p.tokens == 0 or p.tokens > after]
    validation = [p for pilot in pilots if pilot.validation for p in read_points(pilot_dir(folder, pilot.name), pilot)]
    plan = make_plan(recipe.plan, fitted, recipe.target_language, validation or None)
    return write_plan(folder, recipe, plan, fitted, validation, key)
