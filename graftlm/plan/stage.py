"""The `plan` stage: the pilots of `plan:` trained on the recipe's prepared data, the law fitted to their curves
and the plan written (graftlm/plan/run.py), in runs/<name>/plan/:

    pilots/<pilot>/   a run directory per pilot, whose base/, curated/, vocab/ and packed/ link to the recipe's,
                      so that every pilot trains on the data prepared once
    plan.json         the law, the choice, the validation; the stage's marker, written last
    recipe.yaml       the planned recipe: `graft run` it (with `plan.apply: true`, `graft run` does)
    report.html

Each pilot runs only the train stage, through the runner every stage goes through: a pilot already trained is
skipped, one interrupted resumes from its last checkpoint (deleted once the pilot is trained: its curve is in its
metrics.jsonl). Evaluation is what a pilot measures, so a pilot whose `eval` changed is trained again. The
planned recipe keeps the recipe's name and changes only the mixture's weights and the training, so that it
trains in the same run directory on the same prepared data (checked: the plan is refused otherwise).
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import yaml

from graftlm.errors import GraftError
from graftlm.plan.report import summary
from graftlm.plan.run import run_plan
from graftlm.recipe import Recipe, load_recipe
from graftlm.runs import RunDir, fingerprint, read_json
from graftlm.stage import Stage, bring_up_to_date, link_prepared
from graftlm.train.stage import open_packed

PLAN_FORMAT = 2
"""Bumped when the plan's outputs change, so that older plans are made again."""
PLAN_FILES = ("plan.json", "recipe.yaml", "report.html")


class Plan(Stage):
    """Options: `fresh` trains every pilot again; `train` are the pilots' train-stage options (`on_step_end`)."""

    name = "plan"
    needs = ("base", "curate", "vocab", "pack")
    outputs = ("plan",)

    def enabled(self):
        return self.recipe.plan is not None

    def marker(self, unit):
        return self.run_dir.plan / "plan.json"

    def fingerprint(self, unit):
        dump = self.recipe.model_dump(mode="json")
        plan = {k: v for k, v in dump["plan"].items() if k != "apply"}  # what follows the plan, not the plan
        return [PLAN_FORMAT, plan, dump["target"], dump["train"], dump["mixture"], dump["eval"],
                open_packed(self.recipe, self.run_dir)[1], str(self.run_dir.start_model)]

    def run(self, unit, key):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise GraftError("plan: the pilots train in one process: run `graft plan` without accelerate launch, "
                             "then the planned recipe with it")
        folder = self.run_dir.plan
        for name in PLAN_FILES:
            (folder / name).unlink(missing_ok=True)  # an older recipe's plan is not this one's
        run_plan(self.recipe, folder, self._train_pilot, key)
        changed = prepared_differently(self.recipe, load_recipe(folder / "recipe.yaml"), self.run_dir, self.stages)
        if changed:
            for name in PLAN_FILES:
                (folder / name).unlink()
            raise GraftError(f"plan: the planned recipe would prepare its data again ({', '.join(changed)} "
                             f"changed): it must change only the mixture's weights and the training")

    def _train_pilot(self, recipe: Recipe, folder: Path) -> None:
        run = RunDir(folder, extended_vocab=recipe.vocab is not None)
        fresh = self.fresh or _measured_otherwise(recipe, run)
        link_prepared(self.run_dir, run, self.stages)
        options = {"train": {**self.options.get("train", {}), "fresh": fresh}}
        bring_up_to_date(recipe, run, self.stages, ["train"], options, needs=False)
        shutil.rmtree(run.checkpoints, ignore_errors=True)


def _measured_otherwise(recipe: Recipe, run: RunDir) -> bool:
    """Whether the pilot in `run` was trained (or begun) with other evaluations than `recipe` asks for: the train
    stage does not depend on `eval`, a pilot's measurements do."""
    if not run.recipe.is_file():
        return False
    before = yaml.safe_load(run.recipe.read_text(encoding="utf-8")) or {}
    return before.get("eval") != recipe.model_dump(mode="json")["eval"]


def prepared_differently(recipe: Recipe, other: Recipe, run: RunDir, stages: dict[str, type[Stage]]) -> list[str]:
    """The units of the data-preparing stages (base, curate, vocab, pack) whose inputs differ between two recipes
    in the same run directory: what training `other` there would prepare again."""
    changed = []
    for name, stage_type in stages.items():
        if not stage_type.prepares_data:
            continue
        mine, theirs = stage_type(recipe, run), stage_type(other, run)
        if mine.enabled() != theirs.enabled():
            changed.append(name)
            continue
        units = list(mine.units()) if mine.enabled() else []
        if units != (list(theirs.units()) if theirs.enabled() else []):
            changed.append(name)
            continue
        changed += [mine.describe(u) for u in units
                    if fingerprint(*mine.fingerprint(u)) != fingerprint(*theirs.fingerprint(u))]
    return changed


def planned_recipe_path(run: RunDir) -> Path:
    return run.plan / "recipe.yaml"


def next_steps(run: RunDir, runs_dir: str | os.PathLike, command: bool = True) -> str:
    """What the user is told once the plan is made: the plan, its files and (`command`) the command that trains
    the planned recipe."""
    data = read_json(run.plan / "plan.json")
    text = (f"{summary(data)}\nplan: {run.plan / 'plan.json'} (report: {run.plan / 'report.html'})\n"
            f"planned recipe: {planned_recipe_path(run)}")
    if command:
        words = ["graft", "run", str(planned_recipe_path(run))]
        words += ["--runs-dir", str(runs_dir)] if Path(runs_dir) != Path("runs") else []
        text += f"\ntrain it: {shlex.join(words)}"
    return text
