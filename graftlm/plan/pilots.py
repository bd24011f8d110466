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
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from graftlm.errors import RecipeError
from graftlm.plan.choose import Plan
from graftlm.plan.config import PlanConfig
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


def plan_of(recipe: Recipe) -> PlanConfig:
    if recipe.plan is None:
        raise RecipeError("plan: the recipe has no plan: section (e.g. plan: {ratios: [0.5, 0.7, 0.85, 1.0]})")
    return recipe.plan


def varied_sources(recipe: Recipe) -> list[str]:
    """The sources whose shares the pilots set: `plan.vary`, else the target language's sources."""
    plan = plan_of(recipe)
    if plan.vary:
        return list(plan.vary)
    target = recipe.target_language
    return [name for name in recipe.mixture_weights() if (recipe.sources[name].lang or name) == target]


def check_plan(recipe: Recipe) -> PlanConfig:
    """The checks of `plan:` that need the rest of the recipe, each a RecipeError naming its key."""
    plan = plan_of(recipe)
    for name in plan.vary:
        if name not in recipe.sources:
            raise RecipeError(f"plan.vary: '{name}' is not a source (sources: {', '.join(recipe.sources)})")
    if len(recipe.mixture_weights()) < 2:
        raise RecipeError("plan: the mixture has one source: there is no share to choose (add a replay source)")
    target = recipe.target_language
    if plan.law != "mixing" and any((recipe.sources[n].lang or n) != target for n in plan.vary):
        raise RecipeError(f"plan.vary: law {plan.law} fits the target language's share ('{target}'): vary one of its "
                          f"sources, or use law: mixing to vary another share")
    rest = [n for n in recipe.mixture_weights() if n not in varied_sources(recipe)]
    if not rest:
        raise RecipeError("plan.vary: every source of the mixture is varied: leave at least one replay source out "
                          "of plan.vary, to take what the shares leave")
    if target not in recipe.eval.text:
        raise RecipeError(f"eval.text: the plan needs a set of the target language '{target}' (its key is the "
                          f"language, e.g. {target}: eval/{target}.txt)")
    if len(recipe.eval.text) < 2:
        raise RecipeError("eval.text: the plan needs a source-language set besides the target language's (e.g. "
                          "en: eval/en.txt): its bits per byte are what the tolerance holds")
    steps = pilot_steps(recipe, plan.pilot_tokens)
    if steps < plan.eval_points:
        raise RecipeError(f"plan.pilot_tokens: {plan.pilot_tokens:,} tokens are {steps} optimizer steps of "
                          f"train.batch_tokens {recipe.train.batch_tokens:,}, fewer than plan.eval_points "
                          f"({plan.eval_points}): raise plan.pilot_tokens or lower train.batch_tokens")
    if pilot_warmup(recipe) >= steps:
        raise RecipeError(f"plan.warmup_steps: {pilot_warmup(recipe)} warmup steps leave no constant learning rate "
                          f"in a pilot of {steps} steps")
    for ratio in [*plan.ratios, *([plan.validation.ratio] if plan.validation else [])]:
        pilot_weights(recipe, ratio)
    return plan


def pilot_steps(recipe: Recipe, tokens: int) -> int:
    return math.ceil(tokens / recipe.train.batch_tokens)


def pilot_warmup(recipe: Recipe) -> int:
    """The pilots' warmup in steps: `plan.warmup_steps`, else `train.schedule`'s over a fitted pilot's steps."""
    plan = plan_of(recipe)
    if plan.warmup_steps is not None:
        return plan.warmup_steps
    return recipe.train.schedule.warmup(pilot_steps(recipe, plan.pilot_tokens))


def eval_every(recipe: Recipe) -> int:
    """Steps between a fitted pilot's evaluations: at least `plan.eval_points` of them after the start model's."""
    plan = plan_of(recipe)
    return max(1, pilot_steps(recipe, plan.pilot_tokens) // plan.eval_points)


def pilot_weights(recipe: Recipe, ratio: float | dict[str, float]) -> dict[str, float]:
    """The mixture at a target share (or a mapping of varied shares): the varied sources get it (split among the
    target language's sources by their relative weights), the others share what is left by theirs."""
    weights = recipe.mixture_weights()
    varied = varied_sources(recipe)
    if isinstance(ratio, dict):
        shares = dict(ratio)
    else:
        total = sum(weights[n] for n in varied)
        shares = {n: ratio * (weights[n] / total if total > 0 else 1 / len(varied)) for n in varied}
    rest = {n: w for n, w in weights.items() if n not in shares}
    left = 1.0 - sum(shares.values())
    total = sum(rest.values())
    if left > 1e-9 and total <= 0:
        raise RecipeError(f"mixture: the sources that take what the shares leave ({', '.join(rest)}) all have weight "
                          f"0: give them weights, their relative shares")
    return {**{n: round(s, 6) for n, s in shares.items()},
            **{n: round(left * w / total, 6) if total > 0 else 0.0 for n, w in rest.items()}}


def _target_share(recipe: Recipe, weights: dict[str, float]) -> float:
    target = recipe.target_language
    return round(sum(w for n, w in weights.items() if (recipe.sources[n].lang or n) == target), 6)


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
    for ratio, tokens, validation in runs:
        weights = pilot_weights(recipe, ratio)
        name = ("validate-" if validation else "") + _name(ratio)
        share = _target_share(recipe, weights) if isinstance(ratio, dict) else ratio
        pilots.append(Pilot(name, share, tokens, weights,
                            tuple(pilot_overrides(recipe, weights, tokens, validation)),
                            dict(ratio) if isinstance(ratio, dict) else {}, validation))
    if len({p.name for p in pilots}) != len(pilots):
        raise RecipeError("plan.ratios: two pilots would get the same folder name; rename the varied sources")
    return pilots


def pilot_overrides(recipe: Recipe, weights: dict[str, float], tokens: int, validation: bool = False) -> list[str]:
    """The recipe overrides of one pilot: its mixture and length, a constant learning rate after warmup, its
    evaluations; no EMA, merge or plan (a pilot's curve follows the trained weights, and it is only trained)."""
    overrides = _training(recipe, weights, tokens, {"name": "constant", "warmup_steps": pilot_warmup(recipe)})
    # the validation pilot only needs its last point; the fitted pilots their whole curves
    return overrides + ["train.ema=null", "merge=null", f"eval.every={'null' if validation else eval_every(recipe)}"]


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
