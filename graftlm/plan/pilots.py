"""The recipe side of a plan: the pilot runs as recipe overrides, the points read back from their metrics, and
the planned recipe.

A pilot is the recipe trained for `plan.pilot_tokens` at one target share, with the rest of the mixture keeping
its relative weights, a warmup and then a constant learning rate (so that a prefix of a pilot's curve is what a
shorter pilot would give), and an evaluation every k optimizer steps, k chosen so that there are at least
`plan.eval_points` evaluations after the start model's. Pilots change only the mixture and the training
schedule, never the data: they all train on the data the recipe prepares once.

Overrides are `key=value` strings, as `graft compare --vary` and `--set` write them (values read as YAML), so a
pilot is `pilot_recipe(recipe, pilot)` or `load_recipe(path, [*overrides, *pilot.overrides])`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from graftlm.errors import RecipeError
from graftlm.plan.checks import (check_plan, eval_every, pilot_checkpoint_every, pilot_steps, pilot_warmup,
                                 pilot_weights, plan_of)
from graftlm.plan.choose import Plan
from graftlm.plan.laws import PlanError, Point
from graftlm.recipe import Recipe, apply_override, validate_recipe
from graftlm.runs import RunDir


@dataclass(frozen=True)
class Pilot:
    name: str
    """Its folder name (`r0.7`, `validate-r0.6`, `vi0.6-code0.1`)."""
    ratio: float
    """Its varied share (the target language's, unless `plan.vary` names another source for `law: mixing`); with
    several varied shares, the target language's share of its mixture, for information."""
    tokens: int
    weights: dict[str, float]
    """Its mixture: every source's share."""
    overrides: tuple[str, ...]
    shares: dict[str, float] = field(default_factory=dict)
    """The varied sources' shares, with several `plan.vary` sources."""
    validation: bool = False
    """The validation pilot: not fitted, measured against the prediction."""


def _target_share(recipe: Recipe, weights: dict[str, float]) -> float:
    target = recipe.target_language
    return round(sum(w for n, w in weights.items() if recipe.language_of(n) == target), 6)


def _name(ratio: float | dict[str, float]) -> str:
    """A pilot's folder name: `r0.7`, or `vi0.6-code0.1` (source names stripped to safe characters)."""
    if isinstance(ratio, dict):
        return "-".join(re.sub(r"[^A-Za-z0-9._]+", "", n) + f"{s:g}" for n, s in ratio.items())
    return f"r{ratio:g}"


def pilot_variants(recipe: Recipe) -> list[Pilot]:
    """Every pilot of the plan: one per `plan.ratios`, then the validation pilot (if any)."""
    plan = check_plan(recipe)
    runs = [(ratio, plan.pilot_tokens, False) for ratio in plan.ratios]
    if plan.validation is not None:
        runs.append((plan.validation.ratio, plan.validation.tokens or plan.pilot_tokens, True))
    pilots = []
    for index, (ratio, tokens, validation) in enumerate(runs):
        weights = pilot_weights(recipe, ratio)
        name = ("validate-" if validation else "") + _name(ratio)
        share = _target_share(recipe, weights) if isinstance(ratio, dict) else ratio
        pilots.append(Pilot(name, share, tokens, weights,
                            tuple(pilot_overrides(recipe, weights, tokens, validation, index)),
                            dict(ratio) if isinstance(ratio, dict) else {}, validation))
    if len({p.name for p in pilots}) != len(pilots):
        raise RecipeError("plan.ratios: two pilots would get the same folder name; rename the varied sources")
    return pilots


def pilot_overrides(recipe: Recipe, weights: dict[str, float], tokens: int, validation: bool = False,
                    index: int = 0) -> list[str]:
    """The recipe overrides of one pilot (the `index`-th): its mixture and length, its seed (`plan.seeds`), a
    constant learning rate after warmup, its evaluations of the text sets (the laws fit bits per byte: no choice
    sets, harness tasks, generations or logit lens), its checkpoints (one kept: it only serves to resume an
    interrupted pilot); no EMA, merge or plan (a pilot's curve follows the trained weights, and it is only
    trained)."""
    overrides = _training(recipe, weights, tokens, {"name": "constant", "warmup_steps": pilot_warmup(recipe)})
    # the validation pilot only needs its last point; the fitted pilots their whole curves
    return overrides + ["train.ema=null", "merge=null", f"eval.every={'null' if validation else eval_every(recipe)}",
                        "eval.choice={}", "eval.harness.tasks=[]", "eval.generate.prompts={}", "eval.lens.text={}",
                        f"train.checkpoint_every={pilot_checkpoint_every(recipe)}",
                        "train.keep_checkpoints=1",
                        f"train.seed={recipe.train.seed + (index if plan_of(recipe).seeds == 'per_pilot' else 0)}"]


def _training(recipe: Recipe, weights: dict[str, float], tokens: int, schedule: dict) -> list[str]:
    """Overrides shared by the pilots and the planned recipe: the mixture, the length, the schedule (every training
    phase's own schedule dropped, so that each follows it), the pilots' learning rate, no plan."""
    overrides = [f"mixture.{name}={weight!r}" for name, weight in weights.items()]
    overrides += [f"train.max_tokens={tokens}", "train.max_steps=null", f"train.schedule={json.dumps(schedule)}",
                  f"train.lr={plan_of(recipe).lr or recipe.train.lr!r}", "plan=null"]
    if any(phase.schedule is not None for phase in recipe.train.phases):
        phases = [{**phase.model_dump(mode="json"), "schedule": None} for phase in recipe.train.phases]
        overrides.append(f"train.phases={json.dumps(phases)}")
    return overrides


def _with_overrides(recipe: Recipe, overrides: list[str] | tuple[str, ...], what: str) -> Recipe:
    data = recipe.model_dump(mode="json")  # paths are absolute by now: no folder to resolve them against
    for override in overrides:
        apply_override(data, override)
    try:
        return validate_recipe(data, origin=what)
    except RecipeError as e:
        raise RecipeError(f"{what}: {e}") from None


def pilot_recipe(recipe: Recipe, pilot: Pilot) -> Recipe:
    return _with_overrides(recipe, pilot.overrides, f"plan pilot {pilot.name}")


def read_points(run_dir: str | os.PathLike, pilot: Pilot) -> list[Point]:
    """The measured points of a pilot run: every evaluation of the trained weights in its metrics.jsonl (an
    exported model's, e.g. EMA, is not on the curve), the last of a step kept (a resumed run repeats none, but a
    hand-edited file might)."""
    run = RunDir(Path(run_dir))
    by_step = {r["step"]: r for r in run.read_metrics() if "eval" in r and "model" not in r}
    if not by_step:
        raise PlanError(f"{run.metrics}: no evaluation records: pilot {pilot.name} has not run")
    return [Point(pilot.ratio, int(r["tokens"]), {name: float(v["bpb"]) for name, v in r["eval"]["text"].items()},
                  dict(pilot.shares))
            for _, r in sorted(by_step.items())]


def planned_recipe(recipe: Recipe, plan: Plan) -> Recipe:
    """The input recipe with the chosen mixture, the budget, and a WSD schedule whose warmup and peak are the
    pilots' (so the planned run, until its decay, is the run the pilots' curves describe); without `plan:`, so
    that `graft run` trains it."""
    schedule = {**recipe.train.schedule.model_dump(mode="json"), "name": "wsd",
                "warmup_steps": pilot_warmup(recipe)}
    overrides = _training(recipe, pilot_weights(recipe, plan.chosen.ratio), plan.chosen.budget_tokens, schedule)
    return _with_overrides(recipe, overrides, "the planned recipe")
