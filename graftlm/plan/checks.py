"""What a plan asks of the rest of the recipe, and the pilots' arithmetic: which sources vary, each pilot's
mixture, its optimizer steps, warmup and evaluation interval.

The recipe calls `check_plan` when it is validated (graftlm/recipe.py), so that a plan that cannot run is refused
before anything runs; this module therefore reads the recipe without importing it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from graftlm.errors import RecipeError
from graftlm.plan.config import PlanConfig

if TYPE_CHECKING:
    from graftlm.recipe import Recipe


def plan_of(recipe: "Recipe") -> PlanConfig:
    if recipe.plan is None:
        raise RecipeError("plan: the recipe has no plan: section (e.g. plan: {ratios: [0.5, 0.7, 0.85, 1.0]})")
    return recipe.plan


def varied_sources(recipe: "Recipe") -> list[str]:
    """The sources whose shares the pilots set: `plan.vary`, else the target language's sources."""
    plan = plan_of(recipe)
    if plan.vary:
        return list(plan.vary)
    target = recipe.target_language
    return [name for name in recipe.mixture_weights() if recipe.language_of(name) == target]


def check_plan(recipe: "Recipe") -> PlanConfig:
    """The checks of `plan:` that need the rest of the recipe, each a RecipeError naming its key."""
    plan = plan_of(recipe)
    for name in plan.vary:
        if name not in recipe.sources:
            raise RecipeError(f"plan.vary: '{name}' is not a source (sources: {', '.join(recipe.sources)})")
    if len(recipe.mixture_weights()) < 2:
        raise RecipeError("plan: the mixture has one source: there is no share to choose (add a replay source)")
    target = recipe.target_language
    if plan.law != "mixing" and any(recipe.language_of(n) != target for n in plan.vary):
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
    if (after := fit_after_tokens(recipe)) >= plan.pilot_tokens:
        raise RecipeError(f"plan.fit_after_tokens: {after:,} tokens leave no point of a pilot of "
                          f"{plan.pilot_tokens:,} tokens to fit")
    for ratio in [*plan.ratios, *([plan.validation.ratio] if plan.validation else [])]:
        pilot_weights(recipe, ratio)
    return plan


def pilot_steps(recipe: "Recipe", tokens: int) -> int:
    return math.ceil(tokens / recipe.train.batch_tokens)


def pilot_warmup(recipe: "Recipe") -> int:
    """The pilots' warmup in steps: `plan.warmup_steps`, else `train.schedule`'s over a fitted pilot's steps."""
    plan = plan_of(recipe)
    if plan.warmup_steps is not None:
        return plan.warmup_steps
    return recipe.train.schedule.warmup(pilot_steps(recipe, plan.pilot_tokens))


def fit_after_tokens(recipe: "Recipe") -> int:
    """The tokens after which a pilot's points are fitted: `plan.fit_after_tokens`, else the warmup's."""
    plan = plan_of(recipe)
    if plan.fit_after_tokens is not None:
        return plan.fit_after_tokens
    return pilot_warmup(recipe) * recipe.train.batch_tokens


def eval_every(recipe: "Recipe") -> int:
    """Steps between a fitted pilot's evaluations: at least `plan.eval_points` of them after the start model's."""
    plan = plan_of(recipe)
    return max(1, pilot_steps(recipe, plan.pilot_tokens) // plan.eval_points)


def pilot_checkpoint_every(recipe: "Recipe") -> int:
    """Steps between a pilot's checkpoints: `plan.checkpoint_every`, else a quarter of a fitted pilot's steps."""
    plan = plan_of(recipe)
    return plan.checkpoint_every or math.ceil(pilot_steps(recipe, plan.pilot_tokens) / 4)


def pilot_weights(recipe: "Recipe", ratio: float | dict[str, float]) -> dict[str, float]:
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
