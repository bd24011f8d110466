"""The maths of one optimizer step, behind `TrainModule.train_batch`.

One step = `batch_tokens` tokens, split across processes (DDP or FSDP under `accelerate launch`: train/sharding.py)
and micro-batches (gradient accumulation), forward and backward under bf16 autocast with fp32 master weights, then
gradient clipping and AdamW. A non-finite loss skips its update (the divergence guard counts them). Training runs
in phases (graftlm/train/phases.py), each with its own trainable parameters, a fresh optimizer and its own schedule:
the module enters the phase of each step by itself.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from graftlm.progress import log
from graftlm.train.config import TrainConfig
from graftlm.train.distill import Distiller
from graftlm.train.flops import flops_per_token, mfu, peak_flops, peak_memory_bytes
from graftlm.train.loss import CausalLMLoss
from graftlm.train.methods import Method, apply_lr, scale_row_updates, trainable_count
from graftlm.train.phases import Phase, phase_at
from graftlm.train.sharding import FullyShard, Replicated
from graftlm.train.speed import to_device, weight_casts_per_step


@dataclass
class StepResult:
    loss: float | None
    """The mean cross-entropy (the distillation term left out); None when the step was skipped."""
    lr: float
    grad_norm: float | None
    skipped: bool
    extra: dict = field(default_factory=dict)
    """Metrics only some runs have: `distill` (the added term), `phase` (with several phases)."""


class TrainModule:
    def __init__(self, method: Method, cfg: TrainConfig, phases: list[Phase], accelerator,
                 distiller: Distiller | None = None, replay: set[str] | None = None,
                 resumed_phase: int | None = None, resumed_optimizer=None, sharding: Replicated | None = None):
        self.method, self.cfg, self.phases, self.accelerator = method, cfg, phases, accelerator
        self.sharding = sharding if sharding is not None else Replicated(accelerator)
        """train.distributed (train/sharding.py): the model replicated (ddp) or sharded (fsdp)."""
        self.distiller, self.replay = distiller, replay
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.phase: Phase | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._resumed = (resumed_phase, resumed_optimizer)
        self._wrapped = self._params = None
        self.trainable = {p.index: trainable_count(*method.parameters(p.train), method.rows) for p in phases}
        self.flops_per_token = flops_per_token(method.model.config, cfg.seq_len, model=method.model)
        peak = peak_flops(accelerator.device, bf16=cfg.precision == "bf16")
        self.peak_flops = peak * self.world if peak else None
        """The devices' peak in the training's precision, all processes together (a table for CUDA, measured once
        for a CPU)."""

    sequences_per_step = property(lambda self: self.cfg.sequences_per_step)
    batch_tokens = property(lambda self: self.cfg.batch_tokens)
    seq_len = property(lambda self: self.cfg.seq_len)

    def train_batch(self, batch: np.ndarray, names: list[str], step: int) -> StepResult:
        """One optimizer step on `batch` (every process's sequences; this process takes its share)."""
        if self.phase is None or not self.phase.covers(step):
            self._enter_phase(phase_at(self.phases, step))
        lr = self.phase.lr_at(step)
        apply_lr(self.optimizer, lr)
        flags = np.array([name in self.replay for name in names]) if self.replay is not None else None
        loss, distilled = self._accumulate_gradients(batch[self.rank::self.world],
                                                     flags[self.rank::self.world] if flags is not None else None)
        loss, distilled = self.accelerator.reduce(torch.stack([loss, distilled]), reduction="mean").tolist()
        finite = math.isfinite(loss)
        grad_norm = float("nan")
        if finite:
            self.sharding.finish_gradients(self.method)
            grad_norm = self.sharding.clip_grad_norm(self._params, self.cfg.grad_clip or float("inf"))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        extra = {}
        if self.distiller is not None:
            extra["distill"] = distilled if finite else None
        if len(self.phases) > 1:
            extra["phase"] = self.phase.index
        return StepResult(loss - distilled if finite else None, lr,
                          grad_norm if math.isfinite(grad_norm) else None, not finite, extra)

    def utilisation(self, tokens_per_s: float) -> dict:
        """Model FLOPs utilisation (6·N + attention FLOPs per token, graftlm/train/flops.py, against the devices'
        peak) and each process's peak memory in GiB (RSS on a CPU, allocated memory on CUDA)."""
        device = self.accelerator.device
        memory = torch.tensor([peak_memory_bytes(device) / 2**30], dtype=torch.float64, device=device)
        per_rank = self.accelerator.gather(memory).tolist() if self.world > 1 else memory.tolist()
        utilisation = mfu(tokens_per_s, self.flops_per_token, self.peak_flops)
        return {"mfu": round(utilisation, 4) if utilisation is not None else None,
                "memory_gib": [round(m, 3) for m in per_rank]}

    def _enter_phase(self, phase: Phase) -> None:
        """The phase's trainable parameters, its fresh optimizer (or the checkpoint's, when resuming inside it) and
        the loss wrapped by the strategy (DDP again per phase: it only synchronises what requires grad when it is
        built; FSDP's sharding was done once, train/sharding.py)."""
        cfg, method = self.cfg, self.method
        groups = method.start_phase(phase.train)
        self.optimizer = torch.optim.AdamW(groups, lr=phase.lr, betas=cfg.betas, eps=cfg.eps,
                                           weight_decay=cfg.weight_decay,
                                           **_fused_if_available(self.accelerator.device))
        resumed_phase, resumed_optimizer = self._resumed
        if resumed_optimizer is not None and resumed_phase == phase.index:
            self.sharding.load_optimizer(self.optimizer, resumed_optimizer)
        scale_row_updates(self.optimizer)
        self._resumed = (None, None)
        self._wrapped = self.sharding.wrap(
            CausalLMLoss.from_config(method.model, cfg, self.accelerator.device, self.distiller))
        self._params = [p for group in groups for p in group["params"]]
        self.phase = phase
        total = method.model_size()
        log(f"train: phase {phase.index + 1}/{len(self.phases)} ({phase.train}, {phase.steps} steps, peak lr "
            f"{phase.lr:g}): {self.trainable[phase.index]:,} trainable parameters of {total:,} "
            f"({self.trainable[phase.index] / total:.2%})")

    def _accumulate_gradients(self, local_batch: np.ndarray,
                              local_replay: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over micro-batches; returns the mean loss over this process's sequences and the
        distillation term's share of it. `local_replay` marks the sequences to distill on (None: no distillation)."""
        cfg, accelerator, wrapped = self.cfg, self.accelerator, self._wrapped
        tokens = to_device(local_batch, accelerator.device)
        micro_batches = tokens.split(cfg.micro_batch_size)
        replay = [None] * len(micro_batches) if local_replay is None else \
            torch.from_numpy(local_replay).to(accelerator.device).split(cfg.micro_batch_size)
        loss_module = self.sharding.unwrap(wrapped)
        total = torch.zeros((), device=accelerator.device)
        distilled = torch.zeros((), device=accelerator.device)
        with self._weight_casts():  # each weight cast to bf16 once per step
            for i, (micro, flags) in enumerate(zip(micro_batches, replay)):
                weight = len(micro) / len(tokens)
                last = i == len(micro_batches) - 1
                extra = {} if flags is None else {"replay": flags}
                with self.sharding.no_sync(wrapped, last), self.autocast():
                    loss = wrapped(micro[:, :-1], micro[:, 1:], **extra)
                if torch.isfinite(loss):
                    (loss * weight).backward()
                total += loss.detach().float() * weight
                if flags is not None and loss_module.distill_part is not None:
                    distilled += loss_module.distill_part.float() * weight
        return total, distilled

    def _weight_casts(self) -> contextlib.ExitStack:
        """One bf16 cast of each weight per step, shared by its micro-batches (autocast's, and the chunked loss's
        of the output weight): not under FSDP, whose units gather and free their weights per micro-batch (a cache
        across them would hold the whole model gathered)."""
        casts = contextlib.ExitStack()
        if not isinstance(self.sharding, FullyShard):
            casts.enter_context(weight_casts_per_step(self.cfg, self.accelerator.device))
            casts.enter_context(self.sharding.unwrap(self._wrapped).casts_per_step())
        return casts

    def autocast(self):
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.precision == "bf16" and self.sharding.autocast)

    def gathered(self, on_device: bool = False, wanted: bool = True):
        """A context: the method with its whole weights on the main process, None on the others (and when the main
        process passes `wanted=False`); every process must enter it (under fsdp the weights are gathered from every
        process's shards)."""
        return self.sharding.gathered(self.method, on_device, wanted)


def _fused_if_available(device: torch.device) -> dict:
    return {"fused": True} if device.type in ("cpu", "cuda") else {}
