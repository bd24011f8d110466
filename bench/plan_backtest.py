"""How far a plan's law can be trusted past its pilots, measured on the pilots themselves: fit each law to every
pilot's points up to a cut, predict each pilot's last point, and print the relative errors.

    .venv/bin/python bench/plan_backtest.py RUN_DIR/plan [--recipe RECIPE] [--cuts 16384,20480] [--law d-cpt]

RUN_DIR is a `graft plan` run whose pilots are trained; RECIPE the recipe planned (default: RUN_DIR/recipe.yaml,
which the planned recipe replaces once it is trained there: then name the original, e.g. recipes/plan-vi.yaml). The
points fitted are those the plan fits (after `plan.fit_after_tokens`) up to each cut; the validation pilot is left
out. A law that is biased (optimistic, say) shows errors of one sign; one that only meets noise, both signs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    from graftlm.plan.checks import fit_after_tokens
    from graftlm.plan.choose import fit_law
    from graftlm.plan.laws import PlanError
    from graftlm.plan.pilots import pilot_variants, read_points
    from graftlm.plan.run import pilot_dir
    from graftlm.recipe import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plan", type=Path, help="runs/<name>/plan")
    parser.add_argument("--recipe", type=Path, help="the recipe planned (default: RUN_DIR/recipe.yaml)")
    parser.add_argument("--cuts", default=None, help="token counts to fit up to (default: every evaluation from "
                                                     "half the pilots' length to the one before the last)")
    parser.add_argument("--law", default=None, help="d-cpt or cmr (default: the recipe's plan.law)")
    args = parser.parse_args()
    recipe_path = args.recipe or args.plan.parent / "recipe.yaml"
    recipe = load_recipe(recipe_path)
    if recipe.plan is None:
        sys.exit(f"plan_backtest: {recipe_path} has no plan: section (the planned recipe replaced it?): name the "
                 f"recipe planned with --recipe")
    law_name = args.law or recipe.plan.law
    after = fit_after_tokens(recipe)
    pilots = [p for p in pilot_variants(recipe) if not p.validation]
    points = {p.name: read_points(pilot_dir(args.plan, p.name), p) for p in pilots}
    last = {name: max(ps, key=lambda p: p.tokens) for name, ps in points.items()}
    tokens = sorted({p.tokens for ps in points.values() for p in ps if p.tokens > after})
    end = min(p.tokens for p in last.values())
    cuts = ([int(c) for c in args.cuts.split(",")] if args.cuts
            else [t for t in tokens if end / 2 <= t < end])
    sets = sorted(next(iter(last.values())).bpb)
    print(f"{args.plan}: law {law_name}, pilots {', '.join(points)}; relative error of the predicted last point")
    errors = {s: [] for s in sets}
    for cut in cuts:
        fitted = [p for ps in points.values() for p in ps if p.tokens == 0 or after < p.tokens <= cut]
        try:
            law = fit_law(law_name, fitted, recipe.target_language, recipe.plan.restarts, left_out=True)
        except PlanError as e:
            print(f"  fit up to {cut:,}: {e}")
            continue
        for s in sets:
            row = []
            for name, p in last.items():
                predicted = float(law.predict(p.ratio, [p.tokens])[s][0])
                row.append((predicted - p.bpb[s]) / p.bpb[s])
            errors[s] += row
            print(f"  fit up to {cut:>7,} ({end / cut:.2f}x) {s:<4}" + "".join(f"{e:+8.2%}" for e in row))
    for s, e in errors.items():
        if e:
            e = np.array(e)
            print(f"{s}: {len(e)} errors, mean {e.mean():+.2%}, mean absolute {np.abs(e).mean():.2%}, "
                  f"worst {e[np.argmax(np.abs(e))]:+.2%}")


if __name__ == "__main__":
    from graftlm.errors import GraftError

    try:
        main()
    except GraftError as e:
        sys.exit(f"plan_backtest: {e}")
