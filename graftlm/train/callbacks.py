"""What a training run does around the loop, one callback each (see train/trainer.py for the hooks).

Order matters (the train stage lists them): the moving average takes each update first, then the step is logged,
sent to the trackers and shown, the divergence guard may stop the run, then evaluation and checkpoints, each at
its own interval; a signal stops the run after them (preemption); at the end the last evaluation, the last
checkpoint, then the export; the test hook last.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from graftlm.errors import GraftError
from graftlm.models import save_model
from graftlm.progress import log, steps_progress
from graftlm.runs import RunDir, atomic_dir
from graftlm.signals import Stopped, requested, signal_name
from graftlm.train.background import BackgroundEvaluations
from graftlm.train.checkpoint import checkpoint_path, complete_checkpoints
from graftlm.train.ema import EMA
from graftlm.train.methods import ADAPTER_DIR, Method
from graftlm.train.trainer import Callback, Trainer


class TrainingDiverged(GraftError):
    exit_code = 3


class MovingAverage(Callback):
    """train.ema: the moving average of the weights, updated after every good optimizer step."""

    def __init__(self, ema: EMA):
        self.ema = ema

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        if not record.get("skipped"):
            self.ema.update()


class MetricsFile(Callback):
    """Every logged record as a line of runs/<name>/metrics.jsonl (main process)."""

    def __init__(self, run: RunDir):
        self.run = run

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        trainer.log(record)

    def on_log(self, trainer: Trainer, record: dict) -> None:
        if trainer.is_main:
            self.run.append_metrics(record)


class ProgressBar(Callback):
    """A bar over the steps with the loss, the lr and the rate; evaluations add their own bars below it."""

    def on_fit_start(self, trainer: Trainer) -> None:
        self._display = steps_progress(show=trainer.is_main)
        trainer.progress = self._display.__enter__()
        self._task = trainer.progress.add_task("train", total=trainer.total_steps, completed=trainer.state.step,
                                               status="")

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        loss = record["loss"] if record["loss"] is not None else float("nan")
        trainer.progress.update(self._task, completed=record["step"], status=f"loss {loss:.3f}  lr "
                                f"{record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s")

    def on_close(self, trainer: Trainer) -> None:
        if trainer.progress is not None:
            self._display.__exit__(None, None, None)
            trainer.progress = None


class DivergenceGuard(Callback):
    """A non-finite loss skips its update; `train.max_bad_steps` of them in a row stop the run."""

    def __init__(self, max_bad_steps: int, run: RunDir):
        self.max_bad_steps, self.run = max_bad_steps, run

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        state = trainer.state
        if not record.get("skipped"):
            state.bad_streak = 0
            return
        state.bad_streak += 1
        state.skipped_steps += 1
        if state.bad_streak >= self.max_bad_steps:
            last = complete_checkpoints(self.run)
            raise TrainingDiverged(
                f"train: {state.bad_streak} non-finite losses in a row at step {state.step}; stopped. "
                f"Last good checkpoint: {last[-1][1] if last else 'none'}. Try a lower train.lr")


class Evaluation(Callback):
    """The held-out sets before the first update, every `eval.every` steps and after the last (the stability-gap
    curve), on the main process; with an exported moving average, the average too, last. At the start and the end
    (`boundary`) everything runs (lm-eval tasks, generations, the logit lens); lm-eval's tasks also every
    `eval.harness.every` steps.

    With `background` (eval.background, train/background.py) the main process only saves a copy of the weights at
    those steps and a worker process evaluates it; finished results are logged at step ends in step order, the
    pending ones waited for at the end (and before an error or a preemption ends the run)."""

    def __init__(self, evaluator, every: list[int | None], evaluated_at: list[int], ema: EMA | None = None,
                 background: BackgroundEvaluations | None = None):
        self.evaluator = evaluator
        self.every = [interval for interval in every if interval]
        self.evaluated_at = evaluated_at
        """Steps already evaluated (by an interrupted run, when resuming)."""
        self.ema = ema
        """Evaluated last when given: the exported model."""
        self.background = background
        """The worker's handle on the main process (None on the others, and in the foreground)."""

    @property
    def _wanted(self) -> bool:
        return self.evaluator is not None or self.background is not None

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.background is not None:
            requeued = self.background.start(trainer.state.step, self.evaluated_at)
            self.evaluated_at[:] = sorted(set(self.evaluated_at) | set(requeued))
        if not self.evaluated_at:
            self._evaluate(trainer, boundary=True)  # the base, before any update

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        last = trainer.state.step == trainer.total_steps  # the trained model: everything, as at the start
        if last or any(trainer.state.step % interval == 0 for interval in self.every):
            self._evaluate(trainer, boundary=last)
        if self.background is not None:
            self.background.collect(trainer.log)

    def on_fit_end(self, trainer: Trainer) -> None:
        if not self.evaluated_at or self.evaluated_at[-1] != trainer.state.step:
            self._evaluate(trainer, boundary=True)
        if self.ema is not None:
            with self.ema.applied(), trainer.module.gathered(self.background is None, self._wanted) as method:
                if method is not None:
                    self._hand_over(trainer, method, boundary=True, model="ema")
        if self.background is not None:
            self.background.collect(trainer.log, wait=True)

    def on_close(self, trainer: Trainer) -> None:
        """After an error or a preemption: the pending evaluations are logged first (unless the worker failed:
        that error is already on its way); a second signal stops the wait."""
        if self.background is None:
            return
        try:
            if self.background.pending:
                self.background.collect(trainer.log, wait=True)
        except GraftError as e:
            log(f"warning: {e}")
        finally:
            self.background.close()

    def _evaluate(self, trainer: Trainer, boundary: bool = False) -> None:
        # every process takes part; the foreground evaluates on the device, the background saves from anywhere
        with trainer.module.gathered(self.background is None, self._wanted) as method:
            if method is not None:
                self._hand_over(trainer, method, boundary)
        self.evaluated_at.append(trainer.state.step)
        trainer.group.wait_for_everyone()

    def _hand_over(self, trainer: Trainer, method: Method, boundary: bool, model: str | None = None) -> None:
        """Evaluate `method`'s model now, or hand a copy of its weights to the worker."""
        record = {"step": trainer.state.step, "tokens": trainer.state.tokens, **({"model": model} if model else {})}
        if self.background is not None:
            self.background.submit(method.export_model(), record, boundary, trainer.log)
        else:
            trainer.log({**record, "eval": self._results(trainer, method, boundary)})

    def _results(self, trainer: Trainer, method: Method, boundary: bool) -> dict:
        return self.evaluator(method.model, progress=trainer.progress, step=trainer.state.step, boundary=boundary)


class Checkpointer(Callback):
    """A checkpoint every `train.checkpoint_every` steps (only of a good state) and at the end, written by the
    main process (fsdp: with every process writing its shards); the other processes wait for it before they look at
    checkpoints/ again."""

    def __init__(self, run: RunDir, every: int, keep: int, tokenizer, recipe_dump: dict, data_key: dict,
                 ema: EMA | None = None):
        self.run, self.every, self.keep = run, every, keep
        self.tokenizer, self.recipe_dump, self.data_key, self.ema = tokenizer, recipe_dump, data_key, ema
        self.saved_step: int | None = None
        """The step of the last checkpoint this run wrote."""

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        step = trainer.state.step
        if self.every and step % self.every == 0 and step < trainer.total_steps and trainer.state.bad_streak == 0:
            self.save(trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        trainer.group.wait_for_everyone()
        saved_steps = [step for step, _ in complete_checkpoints(self.run)]
        if not saved_steps or saved_steps[-1] != trainer.state.step:  # (a run resumed from its final checkpoint)
            self.save(trainer)

    def save(self, trainer: Trainer, preemption: bool = False) -> None:
        trainer.group.wait_for_everyone()
        self.saved_step = trainer.state.step
        state, module = trainer.state, trainer.module
        state.sampler = trainer.sampler.state()
        with module.gathered() as method:  # None on the other processes
            module.sharding.save_checkpoint(
                self.run, state.step, method, self.tokenizer, module.optimizer,
                {"state": asdict(state), "recipe": self.recipe_dump, "data": self.data_key, "preemption": preemption},
                self.keep, self.ema,
                write_more=lambda folder: self._save_more(folder, method))

    @staticmethod
    def _save_more(folder: Path, method: Method) -> None:
        """What a checkpoint needs beyond the merged weights to resume exactly (the strategy adds the optimizer,
        the random states and the EMA)."""
        if method.peft:
            method.model.save_pretrained(folder / ADAPTER_DIR)


class Preemption(Callback):
    """SIGTERM, SIGUSR1 or SIGINT during training (graftlm/signals.py `graceful`): the step is finished, a checkpoint
    written, and the run stops with `Stopped` (exit 128 + the signal's number); the same command resumes from that
    checkpoint exactly.

    Under several processes a signal may reach one of them only, or each after another step: every step they agree
    (an all-reduce of one number, the largest signal number asked for), so that all stop after the same step."""

    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer = checkpointer

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        signum = _agreed(requested(), trainer.group)
        if not signum:
            return
        step = trainer.state.step
        if self.checkpointer.saved_step != step:  # the last step's checkpoint is the scheduled final one
            self.checkpointer.save(trainer, preemption=step < trainer.total_steps)
        trainer.group.wait_for_everyone()  # no process exits while the main one writes (a launcher would kill it)
        raise Stopped(signum, f"train: stopped by {signal_name(signum)} after step {step} of {trainer.total_steps}; "
                              f"checkpoint {checkpoint_path(self.checkpointer.run, step)}; the same command resumes "
                              f"from it")


def _agreed(signum: int, group) -> int:
    """The largest of every process's `signum`."""
    if getattr(group, "num_processes", 1) == 1:
        return signum
    import torch
    import torch.distributed as dist

    flag = torch.tensor([signum], dtype=torch.int32, device=group.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


class Export(Callback):
    """runs/<name>/model/, a plain Hugging Face folder (adapters merged; the moving average when it is exported),
    its marker with what was trained; the adapter alone in runs/<name>/adapter/ (lora, layra)."""

    def __init__(self, run: RunDir, key: str, tokenizer, ema: EMA | None = None):
        self.run, self.key, self.tokenizer, self.ema = run, key, tokenizer, ema

    def on_fit_end(self, trainer: Trainer) -> None:
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext(), \
                trainer.module.gathered() as method:
            if trainer.is_main:
                self._export(trainer, method)
        trainer.group.wait_for_everyone()

    def _export(self, trainer: Trainer, method: Method) -> None:
        state, module, run = trainer.state, trainer.module, self.run
        cfg = module.cfg
        marker = {"fingerprint": self.key, "step": state.step, "tokens": state.tokens,
                  "skipped_steps": state.skipped_steps, "elapsed_s": round(state.elapsed_s, 1),
                  "tokens_by_source": trainer.sampler.tokens_by_source(cfg.seq_len), "method": cfg.method,
                  "trainable_parameters": [{"train": p.train, "steps": p.steps,
                                            "parameters": module.trainable[p.index]} for p in module.phases],
                  "ema": self.ema is not None}
        if method.peft:
            with atomic_dir(run.adapter) as folder:
                method.save_adapter(folder, run.start_model)
        save_model(method.export_model(), self.tokenizer, run.model,
                   extra_files={run.train_marker.name: json.dumps(marker, indent=2)})
        log(f"train: {state.step} steps, {state.tokens:,} tokens in {state.elapsed_s:.0f}s -> {run.model}")


class StepHook(Callback):
    """Calls `hook(step)` after every step (tests use it to interrupt a run at a chosen step)."""

    def __init__(self, hook: Callable[[int], Any]):
        self.hook = hook

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        self.hook(trainer.state.step)
