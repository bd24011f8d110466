"""`eval.background: true`: the evaluations of a training run made by a second process, so the loop does not wait.

    main process (the Evaluation callback)                  worker (one, long-lived, spawned at the start)
    an eval step: the weights -> runs/<name>/eval/pending/    builds the run's evaluator once; for each folder:
      step-000120/ (a plain Hugging Face folder, written        load it, prepare it as training does, evaluate
      under a temporary name), its name -> the worker           (the same `step` and `boundary` as the foreground),
                                                                write step-000120.json, delete the folder
    every step end: log each finished result whose earlier
      ones are logged (eval records stay in step order)
    the end: wait for the pending ones, stop the worker

The numbers are those the foreground would log for the same weights: the worker loads the saved float32 weights
as training loads its start model and applies the same `train.attention`, `train.compile` and `train.threads`
(lora / layra: the weights with the adapters merged, equal up to rounding). A worker that raises or dies ends the
run with a one-line error naming the step and runs/<name>/eval/worker.log (its traceback); the main process never
waits on a dead worker. At most `MAX_PENDING` copies of the weights wait on disk: an evaluation step beyond that
waits for the oldest one.

A run killed with evaluations pending resumes them: the complete folders (and finished results not yet logged) of
steps up to the checkpoint it resumes from are handed to the new worker first.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

from graftlm.errors import GraftError
from graftlm.progress import log
from graftlm.runs import RunDir, read_json, remove_stale, write_json_atomic

MAX_PENDING = 2
"""Copies of the weights waiting for the worker at most (each is the whole model on disk)."""
TASK_FILE = "task.json"
FAILED_FILE = "failed.json"
POLL_S = 0.2
_NAME = re.compile(r"^step-(\d{6,})(-[a-z]+)?$")


@dataclass
class Task:
    name: str
    """step-000120, or step-000120-ema for the exported moving average."""
    record: dict
    """What the logged record holds besides "eval": step, tokens, and `model` for an exported model."""
    boundary: bool


class BackgroundEvaluations:
    """The main process's side: hands weights to the worker and collects its results in order."""

    def __init__(self, run: RunDir, build_evaluator: Callable[[], Any], train_cfg, trust_remote_code: bool, device):
        self.folder = run.inside("eval", "pending")
        self.log_path = run.inside("eval", "worker.log")
        self._worker_args = (build_evaluator, train_cfg, trust_remote_code, str(device))
        """`build_evaluator`: a picklable callable (the worker builds the evaluator with it)."""
        self.pending: list[Task] = []
        self._process = self._tasks = None

    def start(self, resumed_step: int, evaluated_at: list[int]) -> list[int]:
        """Start the worker. Resuming (`resumed_step` > 0), the evaluations an interrupted run left pending at steps
        up to `resumed_step` and after the last logged one are queued first; returns their steps. Everything else
        left in the folder is removed."""
        leftovers = self._leftovers(resumed_step, evaluated_at[-1] if evaluated_at else -1) if resumed_step else []
        if leftovers:
            self._remove_all_but(leftovers)
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / FAILED_FILE).unlink(missing_ok=True)
        context = multiprocessing.get_context("spawn")  # (no fork of a process holding threads and a device)
        self._tasks = context.Queue()
        self._process = context.Process(target=_work, name="graft-eval-worker", daemon=True,
                                        args=(*self._worker_args, self.folder, self.log_path, self._tasks,
                                              os.getpid()))
        self._process.start()
        for task in leftovers:
            self.pending.append(task)
            if not self._result(task).is_file():
                self._tasks.put(task.name)
        if leftovers:
            log(f"eval: resuming {len(leftovers)} background evaluation(s) an interrupted run left "
                f"(steps {', '.join(str(t.record['step']) for t in leftovers)})")
        return [t.record["step"] for t in leftovers if "model" not in t.record]

    def submit(self, model, record: dict, boundary: bool, log_finished: Callable[[dict], None]) -> None:
        """Save `model` (a plain transformers model) for the worker, after waiting while MAX_PENDING copies wait."""
        from graftlm.models import save_model

        while len(self.pending) >= MAX_PENDING:
            self.collect(log_finished, wait=True, limit=1)
        name = f"step-{record['step']:06d}" + (f"-{record['model']}" if record.get("model") else "")
        task = Task(name, record, boundary)
        (self.folder / f"{name}.json").unlink(missing_ok=True)
        save_model(model, None, self.folder / name,
                   extra_files={TASK_FILE: json.dumps({"record": record, "boundary": boundary})})
        self.pending.append(task)
        self._tasks.put(name)

    def collect(self, log_finished: Callable[[dict], None], wait: bool = False, limit: int | None = None) -> None:
        """Log the finished results in submission order (`wait`: until `limit` of them, default all, are logged)."""
        logged = 0
        if wait and self.pending and limit is None:
            log(f"eval: waiting for {len(self.pending)} background evaluation(s) (worker log {self.log_path})")
        while self.pending and (limit is None or logged < limit):
            task = self.pending[0]
            result = self._result(task)
            if not result.is_file():
                self._check_alive(task)
                if not wait:
                    return
                self._wait_a_little()
                continue
            log_finished({**task.record, "eval": read_json(result)["eval"]})
            result.unlink()
            self.pending.pop(0)
            logged += 1

    def close(self) -> None:
        """Stop the worker: at once when evaluations are still pending (an error; their folders stay for a resumed
        run), else after it has taken the order to stop."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.is_alive() and not self.pending:
            self._tasks.put(None)
            process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()
        self._tasks.close()
        self._tasks.join_thread()

    def _result(self, task: Task) -> Path:
        return self.folder / f"{task.name}.json"

    def _check_alive(self, task: Task) -> None:
        failed = self.folder / FAILED_FILE
        if failed.is_file() or not self._process.is_alive():
            self._process.join(timeout=5)
            why = read_json(failed)["error"] if failed.is_file() else \
                f"the worker died (exit code {self._process.exitcode})"
            raise GraftError(f"eval.background: the evaluation of step {task.record['step']} failed: {why} "
                             f"(see {self.log_path})")

    def _wait_a_little(self) -> None:
        wait([self._process.sentinel], timeout=POLL_S)

    def _leftovers(self, resumed_step: int, last_logged: int) -> list[Task]:
        """What an interrupted run left to be logged: complete weights folders and unlogged results, of steps the
        resumed run's metrics do not have yet; a task of an exported model (EMA) is made again at the end."""
        if not self.folder.is_dir():
            return []
        remove_stale(self.folder)
        found = {}
        for path in self.folder.iterdir():
            name = path.name.removesuffix(".json") if path.is_file() else path.name
            if not _NAME.match(name):
                continue
            saved = read_json(path) if path.is_file() else (read_json(path / TASK_FILE)
                                                            if (path / TASK_FILE).is_file() else None)
            if saved is None:
                continue
            record = saved["record"]
            if "model" not in record and last_logged < record["step"] <= resumed_step:
                found[name] = Task(name, record, saved["boundary"])
        return sorted(found.values(), key=lambda t: t.record["step"])

    def _remove_all_but(self, kept: list[Task]) -> None:
        names = {t.name for t in kept} | {f"{t.name}.json" for t in kept}
        for path in self.folder.iterdir():
            if path.name not in names:
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def _work(build_evaluator: Callable[[], Any], train_cfg, trust_remote_code: bool, device: str, folder: Path,
          log_path: Path, tasks, parent: int) -> None:
    """The worker process: evaluate each folder named on `tasks` until None arrives or the parent is gone."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)  # Ctrl-C or a scheduler's signal: the main process decides
    _die_with_parent()
    log_file = open(log_path, "a", buffering=1, encoding="utf-8")
    os.dup2(log_file.fileno(), 1)
    os.dup2(log_file.fileno(), 2)
    sys.stdout = sys.stderr = log_file
    task = None
    try:
        import torch

        from graftlm.models import load_model
        from graftlm.train.speed import prepare_for_speed

        evaluator = build_evaluator()
        log(f"eval worker {os.getpid()}: ready on {device}")
        while True:
            try:
                task = tasks.get(timeout=1.0)
            except Exception:  # queue.Empty
                if os.getppid() != parent:
                    return
                continue
            if task is None:
                return
            started = time.perf_counter()
            saved = read_json(folder / task / TASK_FILE)
            model = load_model(str(folder / task), trust_remote_code=trust_remote_code).to(torch.device(device))
            prepare_for_speed(model, train_cfg, torch.device(device))
            results = evaluator(model, step=saved["record"]["step"], boundary=saved["boundary"])
            del model
            if os.getppid() != parent:  # an orphan: a resumed run may be evaluating this folder already
                return
            write_json_atomic(folder / f"{task}.json", {**saved, "eval": results})
            shutil.rmtree(folder / task)
            log(f"eval worker: {task} in {time.perf_counter() - started:.1f}s")
    except BaseException as e:
        traceback.print_exc()
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        write_json_atomic(folder / FAILED_FILE, {"task": task, "error": f"{type(e).__name__}: {message}".rstrip(": ")})
        sys.exit(1)


def _die_with_parent() -> None:
    """Linux: the kernel kills the worker when the main process dies (SIGKILL included); elsewhere the worker
    notices within a second that its parent changed."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
