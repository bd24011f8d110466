"""Methods against forgetting on a tiny random model: lora, layra, freeze, embeddings-first stages, EMA,
distillation on replay; each exports a plain Hugging Face folder, and resume stays exact."""


import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import kill_training_mid_run, run_graft, train, write_tiny_recipe
from graftlm.errors import RecipeError
from graftlm.pipeline import run_stages
from graftlm.recipe import load_recipe
from graftlm.runs import RunDir
from graftlm.vocab.init import VOCAB_ROWS_FILE, VocabRows

TRAIN = "seq_len: 32, batch_tokens: 128, max_steps: 6, lr: 1.0e-2, checkpoint_every: 3, micro_batch_size: 2"
NEW_ROWS = VocabRows(first_new=49100, new_tokens=40, rows=49152)
"""The tiny model's 49152 rows, as if a vocabulary extension had added 40 tokens (and 12 padding rows)."""
EMBED = "model.embed_tokens.weight"


@pytest.fixture
def make_run(tmp_path, tiny_model_dir):
    """make_run(*overrides, runs="runs") -> (recipe path, recipe, run) with the base exported and the sources
    packed; the base claims NEW_ROWS as the new rows of an extended vocabulary."""
    path = write_tiny_recipe(tmp_path, tiny_model_dir, TRAIN)

    def make(*overrides: str, runs: str = "runs"):
        recipe = load_recipe(path, list(overrides))
        run = RunDir.for_recipe(recipe, tmp_path / runs)
        run_stages(recipe, run, ("base", "pack"))
        (run.base / VOCAB_ROWS_FILE).write_text(NEW_ROWS.to_json())
        return path, recipe, run

    return make


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


def losses(run: RunDir) -> dict[int, tuple]:
    return {r["step"]: (r["loss"], r.get("distill")) for r in run.read_metrics() if "loss" in r}


def test_lora_exports_a_merged_model_and_the_adapter_alone(make_run, tmp_path, monkeypatch, capsys):
    from peft import PeftModel

    _, recipe, run = make_run("train.method=lora", "train.lora.embeddings=new_rows")
    train(recipe, run)
    start, out = weights(run.base), weights(run.model)
    assert out.keys() == start.keys()  # a plain HF folder: adapters merged, nothing of peft left
    embed_changed = ~(start[EMBED] == out[EMBED]).all(1)
    assert not embed_changed[:NEW_ROWS.first_new].any() and embed_changed[NEW_ROWS.new_rows.start:].any()
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"} <= changed(start, out)

    adapter = load_file(run.adapter / "adapter_model.safetensors")  # the new rows alone, not the whole matrix
    assert max(t.shape[0] for name, t in adapter.items() if "trainable_tokens" in name) == NEW_ROWS.new_tokens
    exported = AutoModelForCausalLM.from_pretrained(run.model)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.base), run.adapter)
    tokens = torch.randint(0, 49152, (2, 16))
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=tokens).logits, exported(input_ids=tokens).logits, atol=1e-4)

    checkpoint = run.checkpoints / "step-000003"
    assert weights(checkpoint).keys() == start.keys() and (checkpoint / "adapter").is_dir()
    text = tmp_path / "held_out.txt"
    text.write_text("Xin chào thế giới.\nHello world.\n")
    code, out_json, _ = run_graft(monkeypatch, capsys, "eval", "--model", str(checkpoint), "--text", str(text),
                                  "--json")
    assert code == 0 and '"bpb"' in out_json
    marker = (run.model / "graft-train.json").read_text()
    assert '"method": "lora"' in marker and '"parameters"' in marker


def test_layra_leaves_every_middle_block_bit_identical(make_run):
    _, recipe, run = make_run("train.method=layra", "train.layra.first=1", "train.layra.last=1")
    train(recipe, run)
    moved = changed(weights(run.base), weights(run.model))
    assert not {name for name in moved if name.startswith(("model.layers.1.", "model.layers.2."))}
    assert any(n.startswith("model.layers.0.") for n in moved) and any(n.startswith("model.layers.3.") for n in moved)
    assert moved <= {n for n in weights(run.base) if n.startswith(("model.layers.0.", "model.layers.3."))}


def test_freeze_trains_only_the_chosen_parameters(make_run):
    _, recipe, run = make_run("train.method=freeze", "train.freeze.layers=[-1]",
                              "train.freeze.patterns=[input_layernorm]")
    train(recipe, run)
    start = weights(run.base)
    chosen = {n for n in start if n.startswith("model.layers.3.") or "input_layernorm" in n}
    assert changed(start, weights(run.model)) == chosen


def test_new_rows_stage_leaves_the_base_rows_bit_identical_then_all_train(make_run):
    _, recipe, run = make_run("train.stages=[{train: new_rows, max_steps: 3, lr: 0.05}, {train: all}]")
    train(recipe, run)  # weight decay 0.1 throughout: the masked rows must not decay either
    start, after_stage = weights(run.base), weights(run.checkpoints / "step-000003")
    assert changed(start, after_stage) == {EMBED}
    rows_changed = ~(start[EMBED] == after_stage[EMBED]).all(1)
    assert rows_changed.nonzero().squeeze(1).tolist() == list(NEW_ROWS.new_rows)  # padding rows stay too
    assert changed(start, weights(run.model)) == set(start)
    assert [r.get("phase") for r in run.read_metrics() if "loss" in r] == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("override, message", [
    ("train.stages=[{train: embeddings}, {train: all}]", "phases.0: set max_tokens or max_steps"),
    ("train.phases=[{train: embeddings, max_steps: 2}, {train: all, max_steps: 2}]", "the last phase runs to"),
    ("train.stages=[{train: embeddings, max_steps: 6}, {train: all}]", "nothing is left for the last"),
    ("train.method=freeze", "choose what trains"),
    ("train.freeze.layers=['1..3']", "expected an index or a range"),
    ("train.distill={sources: [fr]}", "train.distill.sources: 'fr' is not a source"),
    ("merge={average_last: 3}", "merge.average_last: needs that many checkpoints kept"),
])
def test_recipe_mistakes_name_their_key(make_run, tmp_path, tiny_model_dir, override, message):
    path = write_tiny_recipe(tmp_path, tiny_model_dir, TRAIN)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path, [override])


def test_sigkill_then_resume_is_exact_with_lora_stages_ema_and_distillation(make_run):
    overrides = ["train.method=lora", "train.lora.embeddings=new_rows", "train.lora.dropout=0.1",
                 "train.phases=[{train: new_rows, max_steps: 4}, {train: all, lr: 0.005}]", "train.max_steps=10",
                 "train.ema={decay: 0.8}", "train.distill={weight: 0.5, temperature: 2.0}"]
    path, recipe, run = make_run(*overrides)
    train(recipe, run)
    expected = losses(run)
    assert all(d is not None for _, d in expected.values()) and any(d > 0 for _, d in expected.values())

    _, _, resumed = make_run(*overrides, runs="killed")
    killed_at = kill_training_mid_run(path, resumed, after_step=7, overrides=overrides)
    assert 7 <= killed_at < 10, "the run must be killed mid-way, in the second phase"

    train(recipe, resumed)  # from step 6: inside the second phase, its optimizer, EMA and dropout state restored
    assert losses(resumed) == expected
    assert not changed(weights(run.model), weights(resumed.model))  # the exported EMA, merged, bit for bit
    assert not changed(load_file(run.adapter / "adapter_model.safetensors"),
                       load_file(resumed.adapter / "adapter_model.safetensors"))


def test_interrupted_at_a_phase_boundary_resumes_exactly(make_run):
    overrides = ["train.stages=[{train: embeddings, max_steps: 3}, {train: all}]", "train.ema={decay: 0.5}"]
    _, recipe, run = make_run(*overrides)
    train(recipe, run)
    _, _, resumed = make_run(*overrides, runs="interrupted")

    def stop(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(recipe, resumed, on_step_end=stop)
    train(recipe, resumed)  # from the checkpoint at step 3, the last of the first phase: a fresh optimizer
    assert losses(resumed) == losses(run)
    assert not changed(weights(run.model), weights(resumed.model))
    assert not changed(weights(run.checkpoints / "step-000006"), weights(resumed.checkpoints / "step-000006"))
