"""`train.lr_groups`: the new embedding rows, the other embedding rows and the rest at their own multiple of the
phase's lr, reaching the optimizer, giving exactly that multiple of the update, and surviving resume bit for bit."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import kill_training_mid_run, train, write_tiny_recipe
from graftlm.errors import RecipeError
from graftlm.pipeline import run_stages
from graftlm.recipe import load_recipe
from graftlm.runs import RunDir
from graftlm.train.checkpoint import load_training_state
from graftlm.train.methods import Method, apply_lr, scale_row_updates
from graftlm.vocab.init import VOCAB_ROWS_FILE, VocabRows

TRAIN = "seq_len: 32, batch_tokens: 128, max_steps: 6, lr: 1.0e-2, checkpoint_every: 3, micro_batch_size: 2"
NEW_ROWS = VocabRows(first_new=49100, new_tokens=40, rows=49152)
EMBED = "model.embed_tokens.weight"
GROUPS = "train.lr_groups={new_rows: 10.0, embeddings: 2.0, rest: 0.5}"


@pytest.fixture
def make_run(tmp_path, tiny_model_dir):
    path = write_tiny_recipe(tmp_path, tiny_model_dir, TRAIN)

    def make(*overrides: str, runs: str = "runs"):
        recipe = load_recipe(path, list(overrides))
        run = RunDir.for_recipe(recipe, tmp_path / runs)
        run_stages(recipe, run, ("base", "pack"))
        (run.base / VOCAB_ROWS_FILE).write_text(NEW_ROWS.to_json())
        return path, recipe, run

    return make


def test_scaled_row_update_equals_a_separate_parameter_at_that_lr():
    """Rows 6-9 of one tensor at 5× the lr, against AdamW on two tensors with lrs 1× and 5×; and why a gradient
    hook would not do: Adam divides the gradient's scale away."""
    torch.manual_seed(0)
    start = torch.randn(10, 4)
    grads = [torch.randn(10, 4) for _ in range(5)]
    settings = {"betas": (0.9, 0.95), "eps": 1e-8}
    one = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW([{"params": [one], "lr_scale": 2.0, "weight_decay": 0.1,
                                    "row_scale": [6, 10, 5.0]}], lr=1.0, **settings)
    scale_row_updates(optimizer)
    old, new = torch.nn.Parameter(start[:6].clone()), torch.nn.Parameter(start[6:].clone())
    reference = torch.optim.AdamW([{"params": [old], "lr": 0.02}, {"params": [new], "lr": 0.1}],
                                  weight_decay=0.1, **settings)
    for g in grads:
        apply_lr(optimizer, 0.01)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.02)
        one.grad, old.grad, new.grad = g.clone(), g[:6].clone(), g[6:].clone()
        optimizer.step()
        reference.step()
    torch.testing.assert_close(one.detach(), torch.cat([old, new]).detach(), rtol=1e-5, atol=1e-6)

    hooked = torch.nn.Parameter(start.clone())
    plain = torch.optim.AdamW([hooked], lr=0.02, weight_decay=0.0, **settings)
    hooked.grad = grads[0] * torch.tensor([1.0] * 6 + [5.0] * 4)[:, None]  # gradient × 5 on the new rows
    plain.step()
    first_step = (hooked - start).abs().detach()
    assert torch.allclose(first_step, torch.full_like(first_step, 0.02), rtol=1e-3)  # every row still at 1× the lr


def test_groups_carry_their_multipliers_and_weight_decay(make_run):
    _, recipe, run = make_run(GROUPS, "train.weight_decay=0.1")
    method = Method.load(recipe.train, run.start_model)
    groups = method.start_phase("all")
    embed = method.model.get_input_embeddings().weight
    assert [(g["lr_scale"], g.get("weight_decay"), g.get("row_scale")) for g in groups] == [
        (0.5, None, None), (2.0, 0.0, [NEW_ROWS.first_new, NEW_ROWS.new_rows.stop, 5.0])]
    assert [id(p) for p in groups[1]["params"]] == [id(embed)]
    assert id(embed) not in {id(p) for p in groups[0]["params"]}
    masked = method.start_phase("new_rows")  # only the new rows learn: at 10×, never decayed
    assert [(g["lr_scale"], g["weight_decay"], g.get("row_scale")) for g in masked] == [(10.0, 0.0, None)]

    _, recipe, run = make_run(GROUPS, "train.method=lora", "train.lora.embeddings=new_rows",
                              "train.embeddings_weight_decay=0.01", runs="lora")
    method = Method.load(recipe.train, run.start_model)
    groups = method.start_phase("all")
    names = {id(p): n for n, p in method.model.named_parameters()}
    assert [g["lr_scale"] for g in groups] == [0.5, 10.0]
    assert all("lora_" in names[id(p)] for p in groups[0]["params"])
    assert [names[id(p)].rsplit(".", 2)[-2] for p in groups[1]["params"]] == ["trainable_tokens_delta"]
    assert groups[1]["weight_decay"] == 0.01


def test_new_rows_move_exactly_their_multiple_of_the_update(make_run):
    """One step from the same start and batch, new rows at 10× against 1×: the new rows' update is 10 times as
    large, every other weight gets the same update."""
    _, recipe, run = make_run("train.max_steps=1", "train.lr_groups={new_rows: 10.0}")
    _, plain_recipe, plain = make_run("train.max_steps=1", "train.lr_groups={new_rows: 1.0}", runs="plain")
    train(recipe, run)
    train(plain_recipe, plain)
    start = load_file(run.base / "model.safetensors")
    fast, slow = (load_file(r.model / "model.safetensors") for r in (run, plain))
    new = slice(NEW_ROWS.first_new, NEW_ROWS.new_rows.stop)
    fast_step, slow_step = fast[EMBED][new] - start[EMBED][new], slow[EMBED][new] - start[EMBED][new]
    assert slow_step.abs().min() > 0
    torch.testing.assert_close(fast_step, 10 * slow_step, rtol=1e-3, atol=1e-7)
    assert torch.equal(fast[EMBED][:new.start], slow[EMBED][:new.start])
    assert torch.equal(fast[EMBED][new.stop:], slow[EMBED][new.stop:])
    assert all(torch.equal(fast[k], slow[k]) for k in start if k != EMBED)


def test_group_lrs_reach_the_optimizer_and_survive_sigkill_and_resume(make_run):
    overrides = [GROUPS, "train.stages=[{train: embeddings, max_steps: 2, lr: 0.02}, {train: all}]",
                 "train.max_steps=8"]
    path, recipe, run = make_run(*overrides)
    train(recipe, run)
    expected = [(r["step"], r["loss"]) for r in run.read_metrics() if "loss" in r]
    _, saved = load_training_state(run.checkpoints / "step-000006")
    phase_lr = next(r["lr"] for r in run.read_metrics() if r.get("step") == 6)
    assert [(g["lr"] / phase_lr, g.get("row_scale")) for g in saved["optimizer"]["param_groups"]] == [
        (pytest.approx(0.5), None), (pytest.approx(2.0), [NEW_ROWS.first_new, NEW_ROWS.new_rows.stop, 5.0])]

    _, _, resumed = make_run(*overrides, runs="killed")
    killed_at = kill_training_mid_run(path, resumed, after_step=4, overrides=overrides)
    assert 4 <= killed_at < 8
    train(recipe, resumed)  # from the checkpoint at step 3, inside the second phase
    assert [(r["step"], r["loss"]) for r in resumed.read_metrics() if "loss" in r] == expected
    final, again = (load_file(r.model / "model.safetensors") for r in (run, resumed))
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_multipliers_must_be_positive(tmp_path, tiny_model_dir):
    path = write_tiny_recipe(tmp_path, tiny_model_dir, TRAIN)
    with pytest.raises(RecipeError, match="train.lr_groups.new_rows"):
        load_recipe(path, ["train.lr_groups.new_rows=0"])
