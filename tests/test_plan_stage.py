"""`graft plan` and `graft run` with a plan: section, end to end on a tiny random model: the pilots trained on the
recipe's prepared data, plan.json and the planned recipe, an interrupted pilot resumed, refusals before any work,
and `plan.apply` stopping after the plan or training the planned recipe on the same prepared data.

A random model's curves follow no scaling law, so these recipes accept any fit (plan.min_r2, plan.max_rmse_bpb):
they test the wiring; tests/test_plan.py tests the fits."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest

from conftest import DATA, write_tiny_recipe
from graftlm.pipeline import STAGES, run_stages
from graftlm.plan.stage import prepared_differently
from graftlm.recipe import load_recipe
from graftlm.runs import RunDir, read_json

TRAIN = "seq_len: 32, batch_tokens: 64, max_steps: 2, lr: 1.0e-3"
EVAL = (f"eval: {{text: {{vi: '{DATA}/eval/sib200/vie_Latn/test.tsv', en: '{DATA}/eval/sib200/eng_Latn/test.tsv'}}, "
        "max_documents: 4, batch_size: 4}\n")
PLAN = ("plan: {{ratios: {ratios}, pilot_tokens: 512, budget_tokens: 1024, tolerance: {{bpb: 1.0}}, "
        "min_r2: 0.01, max_rmse_bpb: 10{more}}}\n")
"""Pilots of 8 steps of 64 tokens, evaluated after every step; the plan for 16 steps."""


def plan_recipe(folder, model, ratios="[0.5, 0.75, 1.0]", more=", validate: {ratio: 0.6, tokens: 768}"):
    return write_tiny_recipe(folder, model, TRAIN, EVAL + PLAN.format(ratios=ratios, more=more))


def graft(*args: str) -> tuple[int, str]:
    """The `graft` command in-process (for module-scoped fixtures, where capsys is not available)."""
    from graftlm.cli import main

    err = io.StringIO()
    argv, sys.argv = sys.argv, ["graft", *args]
    code = 0
    try:
        with contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return code, err.getvalue()


@pytest.fixture(scope="module")
def planned(tmp_path_factory, tiny_model_dir):
    """`graft plan` once: three fitted pilots and a validation pilot."""
    folder = tmp_path_factory.mktemp("plan")
    path = plan_recipe(folder, tiny_model_dir)
    runs = folder / "runs"
    code, err = graft("plan", str(path), "--runs-dir", str(runs))
    assert code == 0, err
    return path, runs, RunDir.for_recipe(load_recipe(path), runs), err


def pilot_losses(run: RunDir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run.read_metrics() if "loss" in r}


def test_graft_plan_trains_the_pilots_on_shared_data_and_writes_the_plan(planned):
    path, runs, run, err = planned
    pilots = run.plan / "pilots"
    assert sorted(p.name for p in pilots.iterdir()) == ["r0.5", "r0.75", "r1", "validate-r0.6"]
    for pilot in pilots.iterdir():
        pilot_run = RunDir(pilot)
        assert pilot_run.packed.is_symlink() and pilot_run.packed.resolve() == run.packed.resolve()
        assert pilot_run.base.is_symlink()  # the base model is exported once, for every pilot
        assert pilot_run.training_summary()["fingerprint"]  # trained through the train stage, marker and all
        assert not pilot_run.checkpoints.exists()  # a trained pilot's checkpoints only served to resume it
        evaluations = [r for r in pilot_run.read_metrics() if "eval" in r]
        assert all(set(r["eval"]["text"]) == {"vi", "en"} and r["eval"]["choice"] == {} for r in evaluations)
        assert len(evaluations) == (2 if pilot.name.startswith("validate") else 9)  # the start model and 8

    data = read_json(run.plan / "plan.json")
    assert {"law", "params", "fit", "predictions", "chosen", "validation", "fingerprint"} <= set(data)
    assert data["law"] == "d-cpt" and set(data["fit"]["r2"]) == {"vi", "en"}
    assert data["validation"]["tokens"] == 768 and set(data["validation"]["measured"]) == {"vi", "en"}
    assert [p["max_tokens"] for p in data["pilots"]] == [512] * 3
    assert data["chosen"]["budget_tokens"] == 1024 and 0.5 <= data["chosen"]["ratio"] <= 1.0

    planned_path = run.plan / "recipe.yaml"
    recipe, planned_recipe = load_recipe(path), load_recipe(planned_path)
    assert planned_recipe.name == "tiny" and planned_recipe.plan is None
    assert planned_recipe.mixture.weights["vi"] == pytest.approx(data["chosen"]["ratio"])
    assert planned_recipe.train.max_tokens == 1024 and planned_recipe.train.schedule.name == "wsd"
    assert prepared_differently(recipe, planned_recipe, run, STAGES) == []  # it trains on the same packed data
    assert prepared_differently(recipe, load_recipe(path, ["sources.vi.max_documents=10"]), run, STAGES) == [
        "pack vi"]
    assert (run.plan / "report.html").read_text().count("data:image/png;base64,") == 2
    assert f"train it: graft run {planned_path} --runs-dir {runs}" in " ".join(err.split())
    assert not run.model.exists()  # graft plan trains only the pilots

    code, again = graft("plan", str(path), "--runs-dir", str(runs))
    assert code == 0 and "plan: up to date" in again and "train: method" not in again


def test_graft_run_stops_after_the_plan_unless_it_applies_it(planned):
    path, runs, run, _ = planned
    code, err = graft("run", str(path), "--runs-dir", str(runs))
    assert code == 0 and "plan: up to date" in err and "stopped after the plan" in err
    assert "train it: graft run" in err and not run.model.exists()

    code, err = graft("run", str(path), "--runs-dir", str(runs), "--set", "plan.apply=true")
    assert code == 0, err
    assert "plan: up to date" in err  # plan.apply does not change the plan
    assert "pack vi: up to date" in err and "pack en: up to date" in err  # nothing prepared again
    trained = run.training_summary()
    chosen = read_json(run.plan / "plan.json")["chosen"]
    assert trained["tokens"] == 1024
    assert trained["tokens_by_source"].get("en", 0) / 1024 == pytest.approx(1 - chosen["ratio"], abs=0.13)
    assert load_recipe(run.recipe).plan is None  # the run's recipe is the planned one that it trained
    assert run.report.is_file()


def test_an_interrupted_pilot_resumes_from_its_checkpoint(planned, tmp_path, tiny_model_dir, capsys):
    _, _, done, _ = planned
    path = plan_recipe(tmp_path, tiny_model_dir, ratios="[0.5, 1.0]", more=", law: cmr")
    recipe = load_recipe(path)
    run = RunDir.for_recipe(recipe, tmp_path / "runs")

    class Interrupted(Exception):
        pass

    def interrupt(step):
        if step == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_stages(recipe, run, ("plan",), options={"plan": {"train": {"on_step_end": interrupt}}})
    pilot = RunDir(run.plan / "pilots" / "r0.5")
    assert [p.name for p in pilot.checkpoints.iterdir()] == ["step-000004"]  # every 2 steps, 1 kept
    assert not (run.plan / "plan.json").exists()

    capsys.readouterr()
    run_stages(recipe, run, ("plan",))
    assert "train: resuming from step-000004 (step 4, 256 tokens)" in capsys.readouterr().err
    # the pilot went on from step 4: the same losses as the uninterrupted pilot of the same share
    assert pilot_losses(pilot) == pilot_losses(RunDir(done.plan / "pilots" / "r0.5"))
    assert [r["step"] for r in pilot.read_metrics() if "loss" in r] == list(range(1, 9))
    assert read_json(run.plan / "plan.json")["law"] == "cmr"


def test_too_few_pilots_is_a_clear_error_before_any_work(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from conftest import run_graft

    path = plan_recipe(tmp_path, tiny_model_dir, more="")
    runs = tmp_path / "runs"
    code, _, err = run_graft(monkeypatch, capsys, "plan", str(path), "--runs-dir", str(runs),
                             "--set", "plan.ratios=[0.5, 1.0]")
    assert code == 2
    assert "plan.ratios: law d-cpt needs at least 3 pilot shares" in " ".join(err.split())
    assert not runs.exists()
    code, _, err = run_graft(monkeypatch, capsys, "run", str(path), "--runs-dir", str(runs),
                             "--set", "plan.pilot_tokens=256")
    assert code == 2 and "plan.pilot_tokens: 256 tokens are 4 optimizer steps" in " ".join(err.split())
    code, _, err = run_graft(monkeypatch, capsys, "plan", str(path), "--runs-dir", str(runs), "--set", "plan=null")
    assert code == 2 and "plan: the recipe has no plan section" in err
    assert not runs.exists()


def test_a_pilot_measured_with_other_evaluations_is_trained_again(planned, tmp_path):
    from graftlm.plan.stage import _measured_otherwise

    _, _, run, _ = planned
    pilot = RunDir(run.plan / "pilots" / "r0.5")
    recipe = load_recipe(pilot.recipe)
    assert not _measured_otherwise(recipe, pilot)
    data = json.loads(json.dumps(recipe.model_dump(mode="json")))
    data["eval"]["max_documents"] = 3
    from graftlm.recipe import validate_recipe

    assert _measured_otherwise(validate_recipe(data), pilot)
    assert not _measured_otherwise(recipe, RunDir(tmp_path / "never-trained"))


def test_pilots_evaluate_only_bits_per_byte(tmp_path, tiny_model_dir):
    """The laws fit bits per byte: a pilot skips the recipe's generations, logit lens and harness tasks (each a
    cost at the start and the end of every pilot)."""
    from graftlm.plan.pilots import pilot_recipe, pilot_variants

    vi = f"{DATA}/eval/sib200/vie_Latn/test.tsv"
    path = plan_recipe(tmp_path, tiny_model_dir)
    recipe = load_recipe(path, [f"eval.generate.prompts={{vi: '{vi}'}}", f"eval.lens.text={{vi: '{vi}'}}",
                                f"eval.harness.tasks=['bpb:vi={vi}']"])
    assert recipe.eval.generate.prompts and recipe.eval.lens.text and recipe.eval.harness.tasks
    for pilot in pilot_variants(recipe):
        evaluation = pilot_recipe(recipe, pilot).eval
        assert evaluation.text == recipe.eval.text and evaluation.choice == {}
        assert not evaluation.generate.prompts and not evaluation.lens.text and not evaluation.harness.tasks


def test_points_inside_the_warmup_are_not_fitted(planned, tmp_path):
    """`plan.fit_after_tokens` (default: the pilots' warmup) leaves the first points out of the fit; the start
    model's points still give the base bpb. Refitting needs no new pilot (the key is not a pilot's)."""
    from graftlm.errors import RecipeError
    from graftlm.plan.run import run_plan

    path, runs, run, _ = planned
    everything = read_json(run.plan / "plan.json")
    # 3 pilots of 8 steps, each evaluated (no warmup: train.schedule's 5 % of 8 steps is none)
    assert everything["fit"]["points"] == {"vi": 24, "en": 24}
    folder = tmp_path / "refit"
    folder.mkdir()
    (folder / "pilots").symlink_to(run.plan / "pilots")
    untrained = []
    later = run_plan(load_recipe(path, ["plan.fit_after_tokens=128"]), folder, lambda *a: untrained.append(a))
    assert later["fit"]["points"] == {"vi": 18, "en": 18}  # steps 1 and 2 (64 and 128 tokens) left out
    assert later["base_bpb"] == everything["base_bpb"] and len(untrained) == 4  # (each pilot offered, none trained)
    with pytest.raises(RecipeError, match="plan.fit_after_tokens: 512 tokens leave no point"):
        load_recipe(path, ["plan.fit_after_tokens=512"])
