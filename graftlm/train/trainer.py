"""The training loop: count steps, draw batches, hand them to the module, tell the callbacks.

    trainer = Trainer(module, sampler, state, total_steps, callbacks, group)
    trainer.fit()

Everything else a run does around the loop (evaluation, checkpoints, the moving average of the weights, metrics,
trackers, the divergence guard, the progress bar) is a `Callback` that owns its interval (train/callbacks.py); the
maths of one optimizer step sits behind `TrainModule.train_batch` (train/module.py). Records a callback logs with
`trainer.log(record)` reach every callback's `on_log` (metrics.jsonl, experiment trackers).

An exception on any process ends the whole group: the failing process aborts the collective communication before
it re-raises, so that no other process waits forever in a barrier or an all-reduce.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from graftlm.data.mix import MixtureExhausted, MixtureSampler
from graftlm.progress import log

if TYPE_CHECKING:
    from rich.progress import Progress

    from graftlm.train.module import TrainModule


@dataclass
class TrainerState:
    """Where training is; saved in every checkpoint (trainer_state.json), so a resumed run continues exactly."""

    step: int = 0
    tokens: int = 0
    bad_streak: int = 0
    skipped_steps: int = 0
    elapsed_s: float = 0.0
    phase: int = 0
    """The phase whose optimizer state the checkpoint holds."""
    sampler: dict = field(default_factory=dict)


class Callback:
    """Behaviour around the loop. Every hook receives the trainer; a hook that raises stops training."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        """Before the first step (also when resuming)."""

    def on_step_end(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        """After an optimizer step (or a skipped one: `record["skipped"]`); `record` is the step's metrics."""

    def on_log(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        """A record for the run's metrics: every step's, and every evaluation's."""

    def on_fit_end(self, trainer: "Trainer") -> None:
        """After the last step, before the model is exported."""

    def on_close(self, trainer: "Trainer") -> None:
        """Always, last, also after an error: release what on_fit_start opened."""


class Trainer:
    def __init__(self, module: "TrainModule", sampler: MixtureSampler, state: TrainerState, total_steps: int,
                 callbacks: Sequence[Callback], group):
        self.module, self.sampler, self.state = module, sampler, state
        self.total_steps = total_steps
        self.callbacks = list(callbacks)
        self.group = group
        """The processes training together (accelerate's state): `is_main_process`, `wait_for_everyone()`."""
        self.progress: "Progress | None" = None
        """The terminal's progress display while fitting (set by the progress callback), for evaluation bars."""

    @property
    def is_main(self) -> bool:
        return self.group.is_main_process

    def fit(self) -> None:
        try:
            self._dispatch("on_fit_start")
            while self.state.step < self.total_steps:
                if not self._step():
                    break
            self._dispatch("on_fit_end")
        except BaseException:
            _abort_collectives(self.group)
            raise
        finally:
            self._dispatch("on_close")

    def _step(self) -> bool:
        """One optimizer step; False when the data ran out."""
        started = time.perf_counter()
        try:
            batch, names = self.sampler.next_batch(self.module.sequences_per_step)
        except MixtureExhausted as e:
            log(f"train: source '{e}' is exhausted and mixture.repeat is false: stopping at step {self.state.step}")
            return False
        result = self.module.train_batch(batch, names, self.state.step)
        state = self.state
        state.step += 1
        state.tokens += self.module.batch_tokens
        state.phase = self.module.phase.index
        seconds = time.perf_counter() - started
        state.elapsed_s += seconds
        tokens_per_s = self.module.batch_tokens / seconds
        record = {"step": state.step, "tokens": state.tokens, "loss": result.loss, "lr": result.lr,
                  "grad_norm": result.grad_norm, "tokens_per_s": round(tokens_per_s, 1),
                  **self.module.utilisation(tokens_per_s), "tokens_by_source": self.sampler.tokens_by_source(self.module.seq_len),
                  "epochs": self.sampler.epochs(), **result.extra}
        if result.skipped:
            record["skipped"] = True
        self._dispatch("on_step_end", record)
        return True

    def log(self, record: dict[str, Any]) -> None:
        self._dispatch("on_log", record)

    def _dispatch(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def _abort_collectives(group) -> None:
    """Tear down the process group of a multi-process run, so that the other processes' pending collectives fail
    at once instead of waiting for this one."""
    import torch.distributed as dist

    if getattr(group, "num_processes", 1) > 1 and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # already broken: exiting is all that is left
            pass
