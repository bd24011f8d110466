"""The training engine on a tiny random model: metrics, checkpoints, exact resume after SIGKILL, NaN handling,
and two DDP processes matching one."""

import os
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from conftest import REPO, kill_training_mid_run, run_graft, train, write_tiny_recipe
from graftlm.errors import GraftError
from graftlm.pipeline import run_stages
from graftlm.recipe import load_recipe
from graftlm.runs import RunDir
from graftlm.train.callbacks import TrainingDiverged

TRAIN = ("seq_len: 32, batch_tokens: 256, max_steps: 12, lr: 1.0e-3, checkpoint_every: 3, keep_checkpoints: 2, "
         "micro_batch_size: 3")


@pytest.fixture
def prepared(tmp_path, tiny_model_dir):
    """A recipe on the tiny model with its base exported and its sources packed."""
    path = write_tiny_recipe(tmp_path, tiny_model_dir, TRAIN)
    recipe = load_recipe(path)
    run = RunDir.for_recipe(recipe, tmp_path / "runs")
    run_stages(recipe, run, ("base", "pack"))
    return path, recipe, run


def losses(run: RunDir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run.read_metrics() if "loss" in r}


def test_training_logs_every_step_and_writes_a_plain_hf_model(prepared):
    _, recipe, run = prepared
    train(recipe, run)
    records = [r for r in run.read_metrics() if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert set(records[0]) >= {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_by_source", "mfu",
                               "memory_gib"}
    assert 0 < records[-1]["mfu"] < 1 and len(records[-1]["memory_gib"]) == 1 and records[-1]["memory_gib"][0] > 0.1
    assert records[-1]["tokens"] == 12 * 256
    assert records[-1]["tokens_by_source"] == {"vi": 72 * 32, "en": 24 * 32}  # 96 sequences of 32, 3:1
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-000009", "step-000012"]
    model = AutoModelForCausalLM.from_pretrained(run.model)
    assert sum(p.numel() for p in model.parameters()) > 0
    first = records[0]["loss"]
    assert min(r["loss"] for r in records[-3:]) < first  # it learns something


def test_sigkill_mid_run_then_resume_logs_the_same_losses(prepared, tmp_path):
    path, recipe, run = prepared
    train(recipe, run)
    expected = losses(run)

    other = tmp_path / "runs2"
    run_stages(recipe, RunDir.for_recipe(recipe, other), ("base", "pack"))
    resumed = RunDir.for_recipe(recipe, other)
    killed_at = kill_training_mid_run(path, resumed, after_step=7)
    assert 7 <= killed_at < 12, "the run must be killed mid-way"

    train(recipe, resumed)
    assert losses(resumed) == expected  # bit-identical floats at every step


def test_killed_before_its_first_checkpoint_starts_over_with_a_clean_log(prepared):
    path, recipe, run = prepared
    killed_at = kill_training_mid_run(path, run, after_step=4, overrides=["train.checkpoint_every=100"])
    assert 4 <= killed_at < 12 and not list(run.checkpoints.glob("step-*"))

    train(recipe, run)
    assert [r["step"] for r in run.read_metrics() if "loss" in r] == list(range(1, 13))


def test_changed_recipe_is_refused_and_fresh_starts_over(prepared, monkeypatch, capsys):
    path, recipe, run = prepared
    stop_at = {"step": 4}

    def kill(step):
        if step == stop_at["step"]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(recipe, run, on_step_end=kill)
    changed = load_recipe(path, ["train.lr=5e-4"])
    with pytest.raises(GraftError, match=r"step-000003: made with a different recipe \(train.lr: 0.001 -> 0.0005\)"):
        train(changed, run)
    code, _, err = run_graft(monkeypatch, capsys, "train", str(path), "--set", "train.lr=5e-4",
                             "--runs-dir", str(run.root.parent), "--fresh")
    assert code == 0
    assert min(losses(run)) and max(losses(run)) and len(losses(run)) == 12


def test_non_finite_losses_skip_updates_then_stop(prepared, monkeypatch):
    _, recipe, run = prepared
    from graftlm.train import loss as loss_module

    real_forward = loss_module.CausalLMLoss.forward
    calls = {"n": 0}

    def sometimes_nan(self, inputs, targets):
        calls["n"] += 1
        value = real_forward(self, inputs, targets)
        step = (calls["n"] - 1) // 3 + 1  # 3 micro-batches per step
        return value * float("nan") if step == 2 or step >= 5 else value

    monkeypatch.setattr(loss_module.CausalLMLoss, "forward", sometimes_nan)
    with pytest.raises(TrainingDiverged, match="5 non-finite losses in a row at step 9.*step-000003"):
        train(recipe, run)
    records = {r["step"]: r for r in run.read_metrics()}
    assert records[2]["skipped"] and records[2]["loss"] is None and records[3]["loss"] is not None


def test_two_ddp_processes_match_one(prepared, tmp_path):
    path, recipe, run = prepared
    fp32 = load_recipe(path, ["train.precision=fp32"])
    train(fp32, run)
    single = losses(run)

    other = tmp_path / "ddp"
    run_stages(fp32, RunDir.for_recipe(fp32, other), ("base", "pack"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # accelerate's multi-process launcher (torchrun underneath); without a GPU the processes form a gloo group
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    subprocess.run([*launch, "-m", "graftlm", "train", str(path), "--set", "train.precision=fp32",
                    "--runs-dir", str(other)], check=True, env=env, cwd=REPO, capture_output=True)
    ddp = losses(RunDir.for_recipe(fp32, other))
    assert ddp.keys() == single.keys()
    for step in single:
        assert ddp[step] == pytest.approx(single[step], rel=1e-5)


FAILING_EVALUATION = """
import os
if os.environ.get("RANK") == "0":  # the main process of an `accelerate launch`: its second evaluation fails
    from graftlm.evaluate import suite
    real, calls = suite.Evaluator.__call__, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("injected evaluation failure")
        return real(self, *args, **kwargs)

    suite.Evaluator.__call__ = failing
"""


def test_an_exception_on_the_main_process_ends_every_process(prepared, tmp_path):
    path, recipe, run = prepared
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAILING_EVALUATION)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(inject), str(REPO)])}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    eval_set = f"eval.text={{vi: '{REPO}/data/eval/sib200/vie_Latn/dev.tsv'}}"
    done = subprocess.run([*launch, "-m", "graftlm", "train", str(path), "--set", eval_set, "--set", "eval.every=2",
                           "--set", "eval.max_documents=2", "--runs-dir", str(run.root.parent)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "injected evaluation failure" in done.stderr
    assert [r["step"] for r in run.read_metrics() if "loss" in r] == [1, 2]  # it stopped at the failing evaluation


# ---- eval.background: evaluations in a worker process ---------------------------------------------------------------

SIB_DEV = f"{REPO}/data/eval/sib200/vie_Latn/dev.tsv"
EVALUATED = [f"eval.text={{vi: '{SIB_DEV}'}}", f"eval.choice={{xcopa_vi: '{REPO}/data/eval/xcopa/vi/val.vi.jsonl'}}",
             "eval.every=4", "eval.max_documents=3", "eval.max_items=4", f"eval.generate.prompts={{vi: '{SIB_DEV}'}}",
             "eval.generate.n=2", "eval.generate.max_new_tokens=4"]


def evaluations(run: RunDir) -> list[tuple[int, dict]]:
    """(step, results) of each evaluation, without the seconds each part took."""
    return [(r["step"], {k: v for k, v in r["eval"].items() if k != "seconds"}) for r in run.read_metrics()
            if "eval" in r]


def test_background_evaluation_logs_what_the_foreground_does(prepared, tmp_path):
    path, _, _ = prepared
    runs = {}
    for background in ("false", "true"):
        recipe = load_recipe(path, [*EVALUATED, f"eval.background={background}"])
        runs[background] = RunDir.for_recipe(recipe, tmp_path / f"background-{background}")
        train(recipe, runs[background])
    foreground, background = (evaluations(runs[b]) for b in ("false", "true"))
    assert [step for step, _ in foreground] == [0, 4, 8, 12]
    assert background == foreground  # the same numbers at the same steps, in step order
    assert "generate" in background[0][1] and "generate" not in background[1][1]  # boundary only at the ends
    timed = [r["eval"]["seconds"] for r in runs["true"].read_metrics() if "eval" in r]
    parts = {f"{kind} {name}" for kind, key in (("bpb", "text"), ("choice", "choice"))
             for name in foreground[0][1][key]}
    assert parts | {f"generate {lang}" for lang in foreground[0][1]["generate"]} <= set(timed[0])
    assert set(timed[1]) == parts and all(s >= 0 for s in timed[1].values())  # every part timed
    assert losses(runs["true"]) == losses(runs["false"])
    pending = runs["true"].inside("eval", "pending")
    assert not list(pending.iterdir())  # every copy of the weights evaluated and removed


SLOW_OR_FAILING_WORKER = """
import os, time
from graftlm.evaluate import suite
real = suite.Evaluator.__call__

def patched(self, model, *args, step=None, **kwargs):
    if step == 4 and os.environ.get("GRAFT_TEST_FAIL"):
        raise RuntimeError("injected evaluation failure")
    while step == 4 and os.path.exists(os.environ.get("GRAFT_TEST_HOLD", "/nonexistent")):
        time.sleep(0.05)
    return real(self, model, *args, step=step, **kwargs)

suite.Evaluator.__call__ = patched
"""


@pytest.fixture
def patched_worker(tmp_path, monkeypatch):
    """The worker process (spawned: it reads PYTHONPATH afresh) with Evaluator.__call__ patched at step 4."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SLOW_OR_FAILING_WORKER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(inject), str(REPO)]))
    return monkeypatch


def test_a_failing_background_evaluation_ends_the_run_in_one_line(prepared, patched_worker, capsys):
    path, recipe, run = prepared
    patched_worker.setenv("GRAFT_TEST_FAIL", "1")
    code, _, err = run_graft(patched_worker, capsys, "train", str(path), *(a for o in EVALUATED for a in ("--set", o)),
                             "--set", "eval.background=true", "--runs-dir", str(run.root.parent))
    assert code != 0
    message = f"eval.background: the evaluation of step 4 failed: RuntimeError: injected evaluation failure " \
              f"(see {run.inside('eval', 'worker.log')})"
    assert message in err
    assert "injected evaluation failure" in run.inside("eval", "worker.log").read_text()  # the traceback is there
    assert [step for step, _ in evaluations(run)] == [0]
    assert not run.model.exists()


def test_killed_with_a_background_evaluation_pending_the_resumed_run_logs_it(prepared, patched_worker, tmp_path):
    path, recipe, run = prepared
    overrides = [*EVALUATED, "eval.background=true"]
    background = load_recipe(path, overrides)
    uninterrupted = RunDir.for_recipe(background, tmp_path / "uninterrupted")
    train(background, uninterrupted)

    hold = tmp_path / "hold"
    hold.touch()  # the worker waits at step 4 while this file exists
    patched_worker.setenv("GRAFT_TEST_HOLD", str(hold))
    killed_at = kill_training_mid_run(path, run, after_step=7, overrides=overrides)
    assert 7 <= killed_at < 12
    assert [step for step, _ in evaluations(run)] in ([], [0])  # step 4's was pending (step 0's may be too)
    assert (run.inside("eval", "pending") / "step-000004").is_dir()

    hold.unlink()
    train(background, run)
    assert evaluations(run) == evaluations(uninterrupted)
    assert losses(run) == losses(uninterrupted)


@pytest.mark.slow
def test_a_compiled_run_killed_then_resumed_logs_the_same_losses(prepared, tmp_path):
    """train.compile (what `auto` picks for long CPU runs): a resumed run repeats the uninterrupted one bit for bit."""
    path, _, run = prepared
    compiled = ["train.compile=true"]
    train(load_recipe(path, compiled), run)
    expected = losses(run)

    recipe = load_recipe(path, compiled)
    resumed = RunDir.for_recipe(recipe, tmp_path / "runs2")
    run_stages(recipe, resumed, ("base", "pack"))
    killed_at = kill_training_mid_run(path, resumed, after_step=7, overrides=compiled)
    assert 7 <= killed_at < 12, "the run must be killed mid-way"
    train(recipe, resumed)
    assert losses(resumed) == expected
