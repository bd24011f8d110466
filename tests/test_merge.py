"""Merging after training (average, interpolate, chat vector) and `graft compare` on a tiny random model."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, run_graft, write_tiny_recipe
from graftlm.errors import GraftError
from graftlm.merge.stage import add_task_vector, average, interpolate
from graftlm.pipeline import run_stages
from graftlm.recipe import load_recipe
from graftlm.report.verdict import compute_verdict
from graftlm.runs import RunDir

TRAIN = "seq_len: 32, batch_tokens: 128, max_steps: 4, lr: 1.0e-2, checkpoint_every: 2, micro_batch_size: 2"
EVAL = """eval:
  text: {{vi: '{data}/eval/sib200/vie_Latn/test.tsv', en: '{data}/eval/sib200/eng_Latn/test.tsv'}}
  max_documents: 3
""".format(data=DATA)


@pytest.fixture
def recipe_path(tmp_path, tiny_model_dir):
    return write_tiny_recipe(tmp_path, tiny_model_dir, TRAIN, EVAL)


def test_interpolate_average_and_task_arithmetic():
    start, trained = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, 6.0])}
    assert interpolate(start, trained, 0.25)["w"].tolist() == [1.0, 3.0]
    assert interpolate(start, trained, 1.0)["w"].tolist() == [4.0, 6.0]
    assert average([start, trained, {"w": torch.tensor([2.0, 1.0])}])["w"].tolist() == [2.0, 3.0]
    # the trained embeddings have two more rows (an extended vocabulary): the vector covers the leading rows
    weights = {"emb": torch.zeros(4, 2), "norm": torch.ones(2), "new": torch.ones(1)}
    instruct = {"emb": torch.full((2, 2), 3.0), "norm": torch.full((2,), 2.0)}
    base = {"emb": torch.ones(2, 2), "norm": torch.ones(2)}
    merged, skipped = add_task_vector(weights, instruct, base, scale=0.5)
    assert merged["emb"].tolist() == [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert merged["norm"].tolist() == [1.5, 1.5] and skipped == ["new"]
    with pytest.raises(GraftError, match="not the same architecture"):
        add_task_vector({"emb": torch.zeros(4, 3)}, instruct, base)


def test_merge_stage_averages_interpolates_and_is_what_the_verdict_describes(recipe_path, tiny_model_dir):
    recipe = load_recipe(recipe_path, ["merge={average_last: 2, alpha: 0.5}",
                                       f"merge.chat_vector={{instruct: '{tiny_model_dir}', base: '{tiny_model_dir}'}}"])
    run = RunDir.for_recipe(recipe, recipe_path.parent / "runs")
    run_stages(recipe, run)
    start, ckpt2, ckpt4 = (load_file(f / "model.safetensors") for f in
                           (run.base, run.checkpoints / "step-000002", run.checkpoints / "step-000004"))
    merged = load_file(run.merged / "model.safetensors")
    for name in start:  # the chat vector of a model minus itself adds nothing
        expected = start[name] + 0.5 * ((ckpt2[name] + ckpt4[name]) / 2 - start[name])
        assert torch.allclose(merged[name], expected, atol=1e-6), name
    record = json.loads((run.merged / "graft-merge.json").read_text())
    assert [os.path.basename(f) for f in record["averaged"]] == ["step-000002", "step-000004"]
    assert record["alpha"] == 0.5 and record["chat_vector"]["scale"] == 1.0

    evaluations = [r for r in run.read_metrics() if "eval" in r]
    assert [r.get("model") for r in evaluations] == [None, None, "merged"]
    verdict = compute_verdict(recipe, run.read_metrics())
    assert verdict.changes[0].final == evaluations[-1]["eval"]["text"]["vi"]["bpb"]
    assert (run.merged / "README.md").is_file() and run.final_model == run.merged

    run_stages(recipe, run, ("merge",))  # up to date: the metrics keep one evaluation of the merged model
    assert [r.get("model") for r in run.read_metrics() if "eval" in r] == [None, None, "merged"]
    run_stages(load_recipe(recipe_path), run, ("train", "merge"))  # merge: removed: the trained model is final
    assert not run.merged.exists() and run.final_model == run.model
    assert [r.get("model") for r in run.read_metrics() if "eval" in r] == [None, None]


def test_ema_export_is_evaluated_last(recipe_path):
    recipe = load_recipe(recipe_path, ["train.ema={decay: 0.5}"])
    run = RunDir.for_recipe(recipe, recipe_path.parent / "runs")
    run_stages(recipe, run, ("base", "pack", "train"))
    evaluations = [r for r in run.read_metrics() if "eval" in r]
    assert [r.get("model") for r in evaluations] == [None, None, "ema"]
    assert evaluations[-1]["eval"] != evaluations[-2]["eval"]
    assert json.loads((run.model / "graft-train.json").read_text())["ema"] is True


def test_graft_compare_shares_the_data_and_writes_one_report(recipe_path, monkeypatch, capsys):
    runs = recipe_path.parent / "runs"
    code, _, err = run_graft(monkeypatch, capsys, "compare", str(recipe_path), "--vary", "train.method=full,lora",
                             "--set", "train.max_steps=2", "--runs-dir", str(runs))
    assert code == 0, err
    folder = runs / "tiny" / "compare"
    assert sorted(p.name for p in folder.iterdir()) == ["method-full", "method-lora", "report.html", "summary.json"]
    for variant in ("method-full", "method-lora"):
        assert (folder / variant / "packed").is_symlink() and (folder / variant / "report.html").is_file()
        assert (folder / variant / "recipe.yaml").read_text().startswith(f"name: tiny-{variant}")
    assert (folder / "method-lora" / "adapter" / "adapter_config.json").is_file()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["method-lora"]["overrides"] == ["train.method=lora"]
    full = summary["method-full"]
    assert {"target_bpb", "source_bpb", "target_delta_bpb", "source_delta_bpb", "pareto"} <= set(full)
    assert full["target_bytes_per_s"] > 0  # bytes of target text a second, beside tokens/s
    target = [c for c in full["changes"].values() if c["role"] == "target" and c["kind"] == "text"]
    assert full["target_bpb"] == pytest.approx(sum(c["final"] for c in target) / len(target))
    assert any(entry["pareto"] for entry in summary.values())
    page = (folder / "report.html").read_text()
    assert "Pareto" in page and "method-lora" in page and page.count("<img src='data:image/png;base64,") >= 2
    assert "target bytes/s" in page


def test_a_variant_shares_the_data_when_its_data_keys_resolve_alike(recipe_path):
    from graftlm.compare import same_data

    recipe = load_recipe(recipe_path, ["vocab={new_tokens: 8}"])
    assert same_data(recipe, load_recipe(recipe_path, ["vocab={new_tokens: 8}", "train.lr=1e-3"]))
    assert same_data(recipe, load_recipe(recipe_path, ["vocab.new_tokens=8"]))  # spelled otherwise, same value
    assert not same_data(recipe, load_recipe(recipe_path, ["vocab.new_tokens=16"]))
    assert not same_data(recipe, load_recipe(recipe_path, ["vocab=null"]))


def test_compare_names_and_grids():
    from graftlm.compare import make_variants, parse_vary, pareto_front

    assert parse_vary("train.freeze.layers=[0,1],[-1]") == ("train.freeze.layers", ["[0,1]", "[-1]"])
    grid = make_variants(["train.method=full,lora", "mixture.en=0,0.25"])
    assert [v.name for v in grid] == ["method-full_en-0", "method-full_en-0.25", "method-lora_en-0",
                                      "method-lora_en-0.25"]
    zipped = make_variants(["train.method=full,lora", "train.lr=1e-4,1e-3"], zip_values=True)
    assert [v.overrides for v in zipped] == [("train.method=full", "train.lr=1e-4"),
                                             ("train.method=lora", "train.lr=1e-3")]
    assert pareto_front({"a": (0.1, -0.5), "b": (0.0, -0.3), "c": (0.2, -0.4), "d": (0.0, -0.3)}) == {"a", "b", "d"}
