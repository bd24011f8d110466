"""FSDP (`train.distributed.strategy: fsdp`) on CPU processes in a gloo group, on the tiny random model: the same
losses as one process, new_rows phases, LoRA with distillation, sharded checkpoints that prove themselves and
resume at another number of processes.

Tolerances: fp32 throughout; two processes split each step's sequences, so every sum (the loss, the gradients'
reduce-scatter) runs in another order than in one process: the losses agree to ~1e-7 relative here, checked at
1e-5 as the DDP test does. The same holds after resuming at another number of processes (the weights, AdamW
moments, EMA and data position are restored exactly; only the order of the sums changes)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, train, write_tiny_recipe
from graftlm.errors import GraftError, RecipeError
from graftlm.pipeline import run_stages
from graftlm.recipe import load_recipe
from graftlm.runs import RunDir, read_json
from graftlm.train.checkpoint import checkpoint_problem
from graftlm.vocab.init import VOCAB_ROWS_FILE, VocabRows

TRAIN = ("seq_len: 32, batch_tokens: 256, max_steps: 9, lr: 1.0e-3, checkpoint_every: 3, keep_checkpoints: 3, "
         "micro_batch_size: 3, precision: fp32")
NEW_ROWS = VocabRows(first_new=49100, new_tokens=40, rows=49152)
"""The tiny model's 49152 rows, as if a vocabulary extension had added 40 tokens (and 12 padding rows)."""
EMBED = "model.embed_tokens.weight"
FULL = ["train.phases=[{train: new_rows, max_steps: 3, lr: 0.05}, {train: all}]", "train.ema={decay: 0.8}",
        "train.gradient_checkpointing=true", "train.lr_groups={new_rows: 3.0}"]
"""A new_rows phase (rows masked on each shard), then all (the new rows' updates scaled on each shard)."""
FSDP = "train.distributed.strategy=fsdp"


def prepare(folder, model, *overrides: str) -> tuple:
    """(recipe path, recipe, run) with the base exported and the sources packed; the base claims NEW_ROWS."""
    folder.mkdir(parents=True, exist_ok=True)
    path = write_tiny_recipe(folder, model, TRAIN)
    recipe = load_recipe(path, list(overrides))
    run = RunDir.for_recipe(recipe, folder / "runs")
    run_stages(recipe, run, ("base", "pack"))
    (run.base / VOCAB_ROWS_FILE).write_text(NEW_ROWS.to_json())
    return path, recipe, run


def launch(path, run: RunDir, processes: int, *overrides: str) -> None:
    """`graft train` under `accelerate launch` with `processes` CPU processes."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "graftlm", "train", str(path), *[a for o in overrides for a in ("--set", o)],
               "--runs-dir", str(run.root.parent)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(run: RunDir) -> dict[int, tuple]:
    return {r["step"]: (r["loss"], r.get("distill")) for r in run.read_metrics() if "loss" in r}


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for step in a:
        assert b[step][0] == pytest.approx(a[step][0], rel=1e-5), step
        assert (a[step][1] is None) == (b[step][1] is None)
        if a[step][1] is not None:
            assert b[step][1] == pytest.approx(a[step][1], rel=1e-4, abs=1e-9), step


def interrupted_copy(run: RunDir, folder, last_step: int) -> RunDir:
    """A copy of a finished run as if it had been killed after its checkpoint at `last_step`."""
    copy = RunDir(folder / run.root.name, extended_vocab=run.extended_vocab)
    shutil.copytree(run.root, copy.root, symlinks=True)
    for checkpoint in copy.checkpoints.iterdir():
        if int(checkpoint.name.removeprefix("step-")) > last_step:
            shutil.rmtree(checkpoint)
    shutil.rmtree(copy.model)
    return copy


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_model_dir):
    """Full training with a new_rows phase, EMA and activation checkpointing: in one process (the plain path), and
    with FSDP in two processes. -> (folder, recipe path, fsdp recipe, single run, fsdp run)."""
    folder = tmp_path_factory.mktemp("fsdp")
    path, recipe, single = prepare(folder / "single", tiny_model_dir, *FULL)
    train(recipe, single)
    path, fsdp_recipe, run = prepare(folder / "sharded", tiny_model_dir, *FULL, FSDP)
    launch(path, run, 2, *FULL, FSDP)
    return folder, path, fsdp_recipe, single, run


def test_two_fsdp_processes_match_one_and_leave_the_base_rows_bit_identical(sharded):
    _, _, _, single, run = sharded
    assert_close(losses(single), losses(run))
    start, after_phase = load_file(run.base / "model.safetensors"), load_file(
        run.checkpoints / "step-000003" / "model.safetensors")
    assert {n for n in start if not torch.equal(start[n], after_phase[n])} == {EMBED}  # the row mask on shards
    rows_changed = ~(start[EMBED] == after_phase[EMBED]).all(1)
    assert rows_changed.nonzero().squeeze(1).tolist() == list(NEW_ROWS.new_rows)
    exported, reference = load_file(run.model / "model.safetensors"), load_file(single.model / "model.safetensors")
    assert exported.keys() == reference.keys()  # one plain Hugging Face folder, the EMA gathered
    for name in reference:
        torch.testing.assert_close(exported[name], reference[name], rtol=1e-4, atol=1e-5)


def test_sharded_checkpoints_prove_themselves_and_load_as_hugging_face_folders(sharded, tmp_path):
    _, _, _, _, run = sharded
    folder = run.checkpoints / "step-000009"
    files = read_json(folder / "manifest.json")["files"]
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng-00000.pt", "rng-00001.pt"} <= set(files)
    assert "training_state.pt" not in files and "ema.safetensors" not in files  # both in the shards
    assert AutoModelForCausalLM.from_pretrained(folder) is not None  # what `graft eval --model` loads
    damaged = tmp_path / "step-000009"
    shutil.copytree(folder, damaged)
    shard = damaged / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of process 1's shard changed
    shard.write_bytes(bytes(data))
    assert checkpoint_problem(damaged) == "dcp/__1_0.distcp does not match its manifest's hash (its bytes changed)"


def test_saved_with_two_processes_resumed_with_one(sharded, tmp_path):
    _, _, fsdp_recipe, single, run = sharded
    resumed = interrupted_copy(run, tmp_path, last_step=6)
    train(fsdp_recipe, resumed)  # FSDP in this process alone: the shards of two processes read into one
    assert_close(losses(run), losses(resumed))
    assert_close(losses(single), losses(resumed))
    exported, uninterrupted = load_file(resumed.model / "model.safetensors"), load_file(run.model / "model.safetensors")
    for name in uninterrupted:  # the weights, optimizer and EMA restored: the same exported average
        torch.testing.assert_close(exported[name], uninterrupted[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_saved_with_two_processes_resumed_with_four(sharded, tmp_path):
    _, path, _, _, run = sharded
    resumed = interrupted_copy(run, tmp_path, last_step=6)  # 8 sequences per step: 2 per process
    launch(path, resumed, 4, *FULL, FSDP)
    assert_close(losses(run), losses(resumed))
    assert {f"rng-{rank:05d}.pt" for rank in range(4)} <= {p.name for p in (resumed.checkpoints / "step-000009").iterdir()}


def test_lora_with_trainable_new_rows_and_distillation_under_fsdp(tmp_path, tiny_model_dir):
    # no dropout: each process draws the dropout masks of its own share of the sequences
    overrides = ["train.method=lora", "train.lora.embeddings=new_rows", "train.lora.dropout=0", "train.max_steps=6",
                 "train.phases=[{train: new_rows, max_steps: 2}, {train: all, lr: 0.005}]",
                 "train.distill={weight: 0.5, temperature: 2.0}"]
    _, recipe, single = prepare(tmp_path / "single", tiny_model_dir, *overrides)
    train(recipe, single)
    path, _, run = prepare(tmp_path / "sharded", tiny_model_dir, *overrides, FSDP)
    launch(path, run, 2, *overrides, FSDP)
    assert_close(losses(single), losses(run))
    assert all(d is not None for _, d in losses(run).values())
    adapter, reference = (load_file(r.adapter / "adapter_model.safetensors") for r in (run, single))
    assert adapter.keys() == reference.keys()
    for name in reference:  # AdamW normalises each element's gradient: one whose gradient is about zero can move
        # by up to ~lr (5e-3) for a rounding-level difference in it
        torch.testing.assert_close(adapter[name], reference[name], rtol=1e-3, atol=1e-3)
    base, merged = load_file(run.base / "model.safetensors"), load_file(run.model / "model.safetensors")
    assert torch.equal(base[EMBED][:NEW_ROWS.first_new], merged[EMBED][:NEW_ROWS.first_new])  # frozen base shards


@pytest.mark.parametrize("overrides", [
    ["train.method=layra", "train.lora.embeddings=all", "train.lora.dropout=0",
     "train.phases=[{train: embeddings, max_steps: 2}, {train: all}]"],
    ["train.method=freeze", "train.freeze.layers=[-1]", "train.freeze.embeddings=new_rows"],
], ids=["layra-embeddings-all", "freeze-new-rows"])
def test_fsdp_in_one_process_trains_every_method_as_the_plain_path(tmp_path, tiny_model_dir, overrides):
    overrides = [*overrides, "train.max_steps=4"]
    _, recipe, plain = prepare(tmp_path / "plain", tiny_model_dir, *overrides)
    train(recipe, plain)
    _, fsdp_recipe, run = prepare(tmp_path / "sharded", tiny_model_dir, *overrides, FSDP)
    train(fsdp_recipe, run)  # a process group of one: the wrapping, gathering and sharded checkpoints all the same
    assert_close(losses(plain), losses(run))
    exported, reference = load_file(run.model / "model.safetensors"), load_file(plain.model / "model.safetensors")
    assert exported.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(exported[name], reference[name], rtol=1e-3, atol=1e-3)
    assert (run.checkpoints / "step-000004" / "dcp" / ".metadata").is_file()


def test_a_failed_sharded_checkpoint_leaves_nothing_and_the_run_resumes(tmp_path, tiny_model_dir, monkeypatch):
    import torch.distributed.checkpoint as dcp

    _, recipe, run = prepare(tmp_path, tiny_model_dir, FSDP)
    real_save, calls = dcp.save, []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the checkpoint at step 6, once part of the shards is written
            real_save(*args, **kwargs)
            raise OSError("injected write failure")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(dcp, "save", failing_save)
    with pytest.raises(OSError, match="injected write failure"):
        train(recipe, run)
    assert [p.name for p in run.checkpoints.iterdir()] == ["step-000003"]  # complete or absent, no leftovers
    monkeypatch.setattr(dcp, "save", real_save)
    train(recipe, run)
    assert [r["step"] for r in run.read_metrics() if "loss" in r] == list(range(1, 10))


def test_a_ddp_checkpoint_is_not_resumed_as_fsdp(tmp_path, tiny_model_dir):
    path, recipe, run = prepare(tmp_path, tiny_model_dir)

    def stop(step):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(recipe, run, on_step_end=stop)
    with pytest.raises(GraftError, match=r"different recipe \(train.distributed.strategy: 'ddp' -> 'fsdp'\)"):
        train(load_recipe(path, [FSDP]), run)


def test_fsdp_options_need_strategy_fsdp(tmp_path, tiny_model_dir):
    path = write_tiny_recipe(tmp_path, tiny_model_dir, TRAIN)
    with pytest.raises(RecipeError, match="train.distributed.*cpu_offload is an option of strategy fsdp"):
        load_recipe(path, ["train.distributed.cpu_offload=true"])
    with pytest.raises(RecipeError, match="train.distributed.strategy"):
        load_recipe(path, ["train.distributed.strategy=zero3"])
