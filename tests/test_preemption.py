"""One writer per run, and preemption (issue 15, items 2 and 4).

The run directory's lock: a second writer refused in one line naming the holder, a dead holder's lock taken over,
every writing command guarded, readers (`graft report`) working beside a training run and writing nothing else, the
processes of one `accelerate launch` not refusing each other. Preemption: SIGTERM, SIGUSR1 and SIGINT finish the
step, write a checkpoint, exit with 128 + the signal's number, and the same command resumes exactly; a second
signal stops at once; several processes stop after the same step."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_graft, train, write_tiny_recipe
from graftlm.pipeline import run_stages
from graftlm.recipe import load_recipe
from graftlm.runs import RunDir, RunLocked, hold_run
from graftlm.signals import Stopped, graceful, requested, stop_if_requested, stop_on_signals
from graftlm.train.checkpoint import checkpoint_problem, is_preemption

TRAIN = ("seq_len: 32, batch_tokens: 256, max_steps: 12, lr: 1.0e-3, checkpoint_every: 3, keep_checkpoints: 2, "
         "micro_batch_size: 3")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def losses(run: RunDir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run.read_metrics() if "loss" in r}


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def hold_in_another_process(root: Path, fork_child: bool = False) -> tuple[subprocess.Popen, int]:
    """A process that takes the run's lock and keeps it; with `fork_child` it forks and ends at once, and its child
    keeps the lock. Returns the process and the PID that keeps the lock."""
    code = textwrap.dedent(f"""
        import os, sys, time
        from graftlm.runs import hold_run
        with hold_run({str(root)!r}):
            if {fork_child} and os.fork():
                os._exit(0)
            print(os.getpid(), flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, cwd=REPO, stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


# ---- the lock ------------------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken(tmp_path, capsys,
                                                                                      monkeypatch):
    root = tmp_path / "runs/r"
    holder, _ = hold_in_another_process(root)
    try:
        with pytest.raises(RunLocked) as e:
            with hold_run(root):
                pass
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"{root}: another graft command is writing into this run")
        assert f"PID {holder.pid} on {socket.gethostname()}, `-c`" in message
        monkeypatch.setenv("RANK", "1")
        with pytest.raises(RunLocked):  # a RANK alone does not make a job
            with hold_run(root):
                pass
        monkeypatch.setenv("WORLD_SIZE", "2")  # a non-main process of a job: the main one holds the lock for it
        with hold_run(root):
            pass
        monkeypatch.delenv("RANK")
        monkeypatch.delenv("WORLD_SIZE")
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: it never releases the lock; the system does
        holder.wait()
    capsys.readouterr()
    with hold_run(root):
        with hold_run(root):  # re-entrant: compare runs the stages of the run it holds
            record = json.loads((root / ".lock").read_text())
            assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert f"the lock of PID {holder.pid}" in capsys.readouterr().err and (root / ".lock").read_text() == ""

    # a process forked by the holder (a datatrove worker) keeps the lock after the holder ended
    parent, child = hold_in_another_process(root, fork_child=True)
    parent.wait()
    try:
        with pytest.raises(RunLocked, match=f"PID {parent.pid} .*that process ended, a process it started still "
                                            f"holds the lock"):
            with hold_run(root):
                pass
    finally:
        os.kill(child, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline:  # the child is not ours to reap: wait for the system to release its lock
        try:
            with hold_run(root):
                break
        except RunLocked:
            time.sleep(0.05)
    else:
        pytest.fail("the lock of a killed process was not released")


def test_every_writing_command_is_refused_while_another_writes(tmp_path, tiny_model_dir, monkeypatch, capsys):
    path = write_tiny_recipe(tmp_path, tiny_model_dir, "seq_len: 32, batch_tokens: 64, max_steps: 2",
                             "curate: {sources: [vi]}\nvocab: {new_tokens: 10}\nmerge: {alpha: 0.5}\n")
    root = tmp_path / "runs/tiny"
    holder, _ = hold_in_another_process(root)
    try:
        for command in ("run", "prepare", "curate", "vocab", "train", "merge"):
            code, _, err = run_graft(monkeypatch, capsys, command, str(path), "--runs-dir", str(tmp_path / "runs"))
            lines = [line for line in err.splitlines() if line.strip()]
            assert code == 2 and len(lines) == 1 and f"PID {holder.pid}" in lines[0], (command, err)
        code, _, err = run_graft(monkeypatch, capsys, "compare", str(path), "--vary", "train.lr=1e-3,2e-3",
                                 "--runs-dir", str(tmp_path / "runs"))
        assert code == 2 and f"PID {holder.pid}" in err and not (root / "compare").exists()
        assert sorted(p.name for p in root.iterdir()) == [".lock"]  # nothing written by the refused commands
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# ---- signals -------------------------------------------------------------------------------------------------

def _signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.5)  # the handler runs at the next bytecode; the sleep is interrupted


def test_a_signal_stops_at_once_outside_training_and_is_noted_inside():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as e:
        with stop_on_signals():
            _signal_self(signal.SIGTERM)
    assert e.value.exit_code == 143 and "stopped by SIGTERM" in str(e.value)
    assert signal.getsignal(signal.SIGTERM) is before  # put back

    with pytest.raises(Stopped) as e:
        with graceful():
            _signal_self(signal.SIGUSR1)
            assert requested() == signal.SIGUSR1  # only noted
            _signal_self(signal.SIGINT)  # a second signal: at once
    assert e.value.exit_code == 130 and "at once" in str(e.value)

    with stop_on_signals():  # noted in training, acted on before the next stage
        with graceful():
            _signal_self(signal.SIGUSR1)
        with pytest.raises(Stopped) as e:
            stop_if_requested()
        assert e.value.exit_code == 138
        stop_if_requested()  # once

    with stop_on_signals():  # a forked process does what the signal does by default
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def test_a_stop_that_a_library_s_clean_up_turns_into_an_error_is_still_a_stop(tmp_path, tiny_model_dir, monkeypatch,
                                                                            capsys):
    """datatrove's local executor frees its rank in a `finally` through a manager process that the same SIGTERM
    (sent to the process group) ended: its ConnectionResetError replaces the Stopped, which must still win."""
    from graftlm.base.stage import Base

    def run(self, unit, key):
        try:
            _signal_self(signal.SIGTERM)
        finally:
            raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(Base, "run", run)
    path = write_tiny_recipe(tmp_path, tiny_model_dir, TRAIN)
    code, _, err = run_graft(monkeypatch, capsys, "prepare", str(path), "--runs-dir", str(tmp_path / "runs"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 143 and len(lines) == 1 and lines[0].startswith("stopped: stopped by SIGTERM"), err


# ---- preemption in training ----------------------------------------------------------------------------------

@pytest.fixture
def recipe_path(tmp_path, tiny_model_dir) -> Path:
    return write_tiny_recipe(tmp_path, tiny_model_dir, TRAIN)


@pytest.fixture
def prepared(tmp_path, recipe_path):
    """A recipe on the tiny model with its base exported and its sources packed, and an uninterrupted run of it."""
    path = recipe_path
    recipe = load_recipe(path)
    reference = RunDir.for_recipe(recipe, tmp_path / "reference")
    train(recipe, reference)
    run = RunDir.for_recipe(recipe, tmp_path / "runs")
    run_stages(recipe, run, ("base", "pack"))
    return path, recipe, run, reference


def test_signals_in_training_checkpoint_and_resume_exactly(prepared):
    _, recipe, run, reference = prepared
    before = signal.getsignal(signal.SIGTERM)  # (SIG_DFL, unless an earlier test's ray.init left its own)

    def signal_at(step_signals: dict[int, list[int]]):
        return lambda step: [os.kill(os.getpid(), s) for s in step_signals.get(step, [])]

    # Ctrl-C twice: at once, the last periodic checkpoint (step 3) stays
    with pytest.raises(Stopped) as e:
        train(recipe, run, on_step_end=signal_at({4: [signal.SIGINT, signal.SIGINT]}))
    assert e.value.exit_code == 130 and "at once" in str(e.value)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-000003"]
    # Slurm's SIGUSR1 after step 5 is acted on after step 6 (the signal comes after that step's check): a checkpoint
    with pytest.raises(Stopped) as e:
        train(recipe, run, on_step_end=signal_at({5: [signal.SIGUSR1]}))
    assert e.value.exit_code == 138 and "after step 6 of 12" in str(e.value) and "step-000006" in str(e.value)
    assert checkpoint_problem(run.checkpoints / "step-000006") is None and max(losses(run)) == 6
    # SIGTERM between two periodic checkpoints: one more, step 8
    with pytest.raises(Stopped) as e:
        train(recipe, run, on_step_end=signal_at({7: [signal.SIGTERM]}))
    assert e.value.exit_code == 143 and "step-000008" in str(e.value)
    # after the last periodic checkpoint (9): off the schedule, not kept or averaged in place of a periodic one
    with pytest.raises(Stopped) as e:
        train(recipe, run, on_step_end=signal_at({9: [signal.SIGTERM]}))
    assert "step-000010" in str(e.value) and is_preemption(run.checkpoints / "step-000010")
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-000006", "step-000009", "step-000010"]
    # at the last step: the final checkpoint itself (keep_checkpoints: 2 keeps 9 and 12, as an uninterrupted run does)
    with pytest.raises(Stopped) as e:
        train(recipe, run, on_step_end=signal_at({11: [signal.SIGTERM]}))
    assert "step-000012" in str(e.value) and not is_preemption(run.checkpoints / "step-000012")
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-000009", "step-000012"]
    train(recipe, run)
    assert losses(run) == losses(reference)  # bit-identical floats at every step
    kept = sorted(p.name for p in run.checkpoints.iterdir())
    assert kept == sorted(p.name for p in reference.checkpoints.iterdir()) == ["step-000009", "step-000012"]
    assert not any(is_preemption(p) for p in run.checkpoints.iterdir())
    assert same_weights(run.model, reference.model)
    assert signal.getsignal(signal.SIGTERM) is before  # put back


SLOW_STEPS = """
import time
from graftlm.train import callbacks
real = callbacks.MetricsFile.on_step_end
def slow(self, trainer, record):
    real(self, trainer, record)
    time.sleep(0.3)  # time for the test to act while training runs
callbacks.MetricsFile.on_step_end = slow
"""


def test_graft_train_refuses_a_second_writer_serves_readers_and_stops_on_sigterm(prepared, tmp_path, monkeypatch,
                                                                                 capsys):
    path, recipe, run, reference = prepared
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SLOW_STEPS)
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(inject), str(REPO)])}
    proc = subprocess.Popen([sys.executable, "-m", "graftlm", "train", str(path), "--runs-dir",
                             str(run.root.parent)], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while max(losses(run), default=0) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    code, _, err = run_graft(monkeypatch, capsys, "train", str(path), "--runs-dir", str(run.root.parent))
    assert code == 2 and f"PID {proc.pid}" in err and "graft train" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_graft(monkeypatch, capsys, "report", str(run.root))  # a reader: works beside the writer
    assert code == 0 and run.report.is_file(), err
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    stopped = [line for line in err.splitlines() if line.startswith("stopped:")]
    assert proc.returncode == 143 and len(stopped) == 1 and "Traceback" not in err, err[-2000:]
    step = max(losses(run))
    assert f"after step {step} of 12" in stopped[0] and checkpoint_problem(run.checkpoints / f"step-{step:06d}") is None
    assert not list(run.root.rglob("*.tmp-*"))

    code, _, err = run_graft(monkeypatch, capsys, "train", str(path), "--runs-dir", str(run.root.parent))
    assert code == 0 and f"resuming from step-{step:06d}" in err
    assert losses(run) == losses(reference) and same_weights(run.model, reference.model)

    # `graft report` writes report.html and the model card, nothing else
    before = {p: p.stat().st_mtime_ns for p in run.root.rglob("*") if p.is_file()}
    code, _, _ = run_graft(monkeypatch, capsys, "report", str(run.root))
    after = {p: p.stat().st_mtime_ns for p in run.root.rglob("*") if p.is_file()}
    assert code == 0 and {p for p in after if before.get(p) != after[p]} == {run.report, run.model / "README.md"}


SIGNAL_ONE_RANK = """
import os, signal
if os.environ.get("RANK") == "1":  # only the second process is told, after step 4
    from graftlm.train import callbacks
    real = callbacks.MetricsFile.on_step_end
    def told(self, trainer, record):
        real(self, trainer, record)
        if trainer.state.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
    callbacks.MetricsFile.on_step_end = told
"""


def test_several_processes_stop_after_the_same_step_and_resume(recipe_path, tmp_path):
    path = recipe_path
    fp32 = load_recipe(path, ["train.precision=fp32"])
    single = RunDir.for_recipe(fp32, tmp_path / "single")
    train(fp32, single)
    run = RunDir.for_recipe(fp32, tmp_path / "ddp")
    run_stages(fp32, run, ("base", "pack"))
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SIGNAL_ONE_RANK)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "graftlm", "train",
              str(path), "--set", "train.precision=fp32", "--runs-dir", str(run.root.parent)]
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(inject), str(REPO)])}
    done = subprocess.run(launch, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "stopped by SIGTERM after step 4 of 12" in done.stderr, done.stderr[-3000:]
    assert max(losses(run)) == 4 and checkpoint_problem(run.checkpoints / "step-000004") is None
    done = subprocess.run(launch, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "resuming from step-000004" in done.stderr, done.stderr[-3000:]
    assert losses(run).keys() == losses(single).keys()
    for step, loss in losses(single).items():
        assert losses(run)[step] == pytest.approx(loss, rel=1e-5)


# ---- a few kills of `graft run` (bench/kill_suite.py runs 25, at random points of every stage) ----------------

def _kill_suite():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kill_suite", REPO / "bench/kill_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kill_suite"] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_graft_run_killed_then_stopped_ends_identical_to_an_uninterrupted_run(tmp_path, tiny_model_dir,
                                                                              monkeypatch, capsys):
    suite = _kill_suite()
    light = "\n".join(line for line in suite.RECIPE.splitlines() if not line.startswith(("curate:", "vocab:")))
    path = suite.write_recipe(tmp_path, tiny_model_dir, light)  # the stages base, pack, train, merge, report
    reference = RunDir(tmp_path / "reference/kill")
    code, _, err = run_graft(monkeypatch, capsys, "run", str(path), "--runs-dir", str(reference.root.parent))
    assert code == 0, err
    expected = suite.Outcome.of(reference.root)
    ends = {stage: count for stage, count in suite.end_lines().items() if stage not in ("curate", "vocab")}
    run = RunDir(tmp_path / "runs/kill")

    # SIGKILL to the whole process group while it packs (or just after)
    first = suite.GraftRun(path, run.root.parent, ends)
    while first.proc.poll() is None and first.stage_started_at("pack") is None:
        time.sleep(0.02)
    time.sleep(0.3)
    os.killpg(first.proc.pid, signal.SIGKILL)
    assert first.wait()[0] == -signal.SIGKILL
    # run again, and SIGTERM it once it trained 6 steps: it checkpoints, says so in one line, exits 143
    second = suite.GraftRun(path, run.root.parent, ends)
    while second.proc.poll() is None and max(losses(run), default=0) < 6:
        time.sleep(0.02)
    os.killpg(second.proc.pid, signal.SIGTERM)
    rc, output = second.wait()
    assert rc == 143 and output.count("stopped: train: stopped by SIGTERM") == 1 and "Traceback" not in output, \
        output[-2000:]
    assert not suite.leftovers(run.root)
    # and again, to the end
    code, _, err = run_graft(monkeypatch, capsys, "run", str(path), "--runs-dir", str(run.root.parent))
    assert code == 0 and "resuming from step-" in err, err
    outcome = suite.Outcome.of(run.root)
    assert outcome.same_weights(expected) and set(outcome.weights) == {"model", "merged"}
    assert outcome.losses == expected.losses and outcome.evaluations == expected.evaluations
