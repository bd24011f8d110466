"""Experiment trackers: TensorBoard receives what metrics.jsonl holds, read back from its event files."""

import pytest

from conftest import DATA, train, write_tiny_recipe
from graftlm.errors import RecipeError
from graftlm.recipe import load_recipe
from graftlm.runs import RunDir
from graftlm.train import trackers


def test_tensorboard_gets_every_step_and_evaluation_and_the_recipe(tmp_path, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = (f"eval: {{text: {{vi: '{DATA}/eval/sib200/vie_Latn/dev.tsv'}}, max_documents: 4, every: 2}}\n"
             "report: {trackers: [tensorboard]}")
    path = write_tiny_recipe(tmp_path, tiny_model_dir, "seq_len: 32, batch_tokens: 64, max_steps: 3", extra)
    recipe = load_recipe(path)
    run = RunDir.for_recipe(recipe, tmp_path / "runs")
    train(recipe, run)
    events = EventAccumulator(str(run.trackers / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    metrics = run.read_metrics()
    losses = {r["step"]: r["loss"] for r in metrics if "loss" in r}
    logged = {e.step: e.value for e in events.Scalars("loss")}
    assert logged.keys() == losses.keys() == {1, 2, 3}
    assert all(logged[s] == pytest.approx(losses[s], rel=1e-6) for s in losses)
    bpb = {r["step"]: r["eval"]["text"]["vi"]["bpb"] for r in metrics if "eval" in r}
    assert {e.step: pytest.approx(e.value, rel=1e-6) for e in events.Scalars("eval/text/vi/bpb")} == bpb
    assert {0, 2, 3} == set(bpb)
    assert {"lr", "grad_norm", "tokens_per_s", "tokens_by_source/vi", "tokens_by_source/en"} <= set(
        events.Tags()["scalars"])
    assert "recipe/text_summary" in events.Tags()["tensors"]


def test_scalars_are_flat_numbers_and_the_ema_is_prefixed():
    record = {"step": 3, "tokens": 9, "model": "ema", "eval": {"text": {"vi": {"bpb": 2.0, "documents": 4}},
                                                            "choice": {"x": {"accuracy": 0.5, "ci95": [0.1, 0.9]}}}}
    assert trackers.scalars(record) == {"ema/eval/text/vi/bpb": 2.0, "ema/eval/text/vi/documents": 4.0,
                                        "ema/eval/choice/x/accuracy": 0.5}
    assert trackers.scalars({"step": 1, "loss": None, "lr": 1e-3, "skipped": True}) == {"lr": 1e-3}


def test_a_missing_tracker_package_fails_before_any_work(tmp_path, tiny_model_dir, monkeypatch):
    path = write_tiny_recipe(tmp_path, tiny_model_dir, "seq_len: 32, batch_tokens: 64, max_steps: 3",
                             "report: {trackers: [wandb]}")
    recipe = load_recipe(path)
    run = RunDir.for_recipe(recipe, tmp_path / "runs")
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RecipeError, match=r"^report.trackers: wandb needs the package wandb: pip install"):
        train(recipe, run)
    assert not run.root.exists()  # said before the base export
