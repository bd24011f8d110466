"""`train.distributed`: how the processes of a run share the model, and the checkpoints that go with it.

    sharding = prepare_sharding(method, cfg, accelerator)   # fsdp: shards the model now, before the EMA copies it
    wrapped = sharding.wrap(loss)                          # each phase: what forward and backward run through
    with sharding.gathered(method) as whole: ...           # the whole model on the main process (eval, export)

**ddp** (`Replicated`, also a single process): every process holds the whole model, its gradients and the optimizer
state; Accelerate's DDP wrapper averages the gradients (rebuilt each phase, since DDP only synchronises what
requires grad when it is built). Checkpoints are written by the main process (train/checkpoint.py).

**fsdp** (`FullyShard`): FSDP2, torch's `fully_shard`, applied here directly: one unit per transformer block, then
the root unit (`_Root`: the embeddings, the final norm, the output head and whatever else is outside the blocks,
such as peft's trainable copies). Each process holds 1/N of every weight, gradient, AdamW moment and EMA shadow
(DTensors sharded on dim 0); a unit's weights are all-gathered while it computes and freed after (the blocks after
their forward pass too, with `reshard_after_forward`), and gradients are reduce-scattered after each micro-batch's
backward pass (reducing only after the last would hold whole gradients until then, what FSDP exists to avoid).
Not Accelerate's FSDP plugin (version 2), for two reasons: Accelerate 1.15 switches its FSDP mode on only for GPU-like
devices, so with `cpu=True` (CPU processes in a gloo group, how graftlm is tested) the plugin is silently ignored and
the run would train replicated; and its wrapping puts the embeddings, final norm and head in a unit gathered by
those modules' own forward calls, while graftlm's chunked loss reads the head's weight itself (train/loss.py) — so
the root unit must be the module whose forward runs the whole loss, which `_Root` is.

Precision: on CUDA with bf16, FSDP's MixedPrecisionPolicy (bf16 compute weights, fp32 gradient reduction, fp32
sharded master weights) and no autocast; on a CPU fp32 weights under bf16 autocast, as DDP does, so that FSDP and
DDP compute the same numbers. Activation checkpointing (`train.gradient_checkpointing`) is transformers' per block
(non-reentrant), which FSDP2 composes with: the recomputation inside the backward pass reuses the gathered weights.

Phases: the model is sharded once; each phase sets requires_grad on the sharded parameters (FSDP2 copies it to the
gathered ones at every all-gather and reduce-scatters only gradients that exist) and builds a fresh AdamW over them.
`new_rows` phases: the gradient hooks of `vocab.init.train_only_rows` would sit on the sharded parameter, whose
gradient FSDP assigns after the reduce-scatter without running them, so the rows are masked explicitly instead, on
each process's own shard of the gradient (`finish_gradients`), before clipping.

EMA: built after the sharding, its shadows are DTensors sharded like the parameters. Distillation: the teacher is
not sharded but held whole by every process, in bf16 (2 bytes per parameter, against the student's 16 before
sharding: fp32 weights, gradients and two AdamW moments); sharding it would add an all-gather per block and micro-
batch to a model that has no gradients or optimizer state to save. A teacher too large for one device is not served.

Checkpoints (fsdp) keep the layout of train/checkpoint.py — a Hugging Face folder (for `graft eval --model`, and the
checkpoint averaging of `merge.average_last`) with trainer_state.json and manifest.json — and hold instead of
training_state.pt and ema.safetensors:

    dcp/               torch.distributed.checkpoint: the model, the optimizer (by parameter name) and the EMA, each
                       process writing its own shards in parallel (one __<rank>_0.distcp each, .metadata by rank 0)
    rng-00000.pt ...   each process's random states

Every process writes into the main process's temporary folder, which is renamed when all have finished, so a
checkpoint is complete or absent as before, and its manifest covers the shards. The Hugging Face copy is gathered
once per checkpoint onto the main process (get_model_state_dict(full_state_dict=True, cpu_offload=True)): that costs
one whole model in CPU memory on the main process while it is written, and keeps every checkpoint usable by the rest
of graftlm. Resuming reads the shards into whatever sharding the new run has, so a run saved with 2 processes
resumes with 1 or 4 (where the batch divides). Exact at any number of processes: weights, optimizer state, EMA,
the data position (every process draws the same global batch and takes its share) and the schedule; each process
restores its own random state when the number of processes is the same; at another number, process r takes the
state saved by process r (by process 0 if there was none), so random draws (dropout) follow another pattern than an
uninterrupted run's. Losses then agree to float rounding, not bit for bit: the sums run over another split of the
sequences.
"""

from __future__ import annotations

import contextlib
import copy
import gc
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from graftlm.progress import log
from graftlm.runs import RunDir
from graftlm.train.checkpoint import load_training_state, restore_rng_states, rng_states, save_checkpoint
from graftlm.train.config import TrainConfig
from graftlm.train.ema import EMA
from graftlm.train.methods import Method, _blocks, local_rows

DCP_DIR = "dcp"


def prepare_sharding(method: Method, cfg: TrainConfig, accelerator) -> "Replicated":
    """The strategy of `train.distributed`; fsdp shards `method`'s model in place."""
    if cfg.distributed.strategy == "fsdp":
        return FullyShard(method, cfg, accelerator)
    return Replicated(accelerator)


def rng_file(rank: int) -> str:
    return f"rng-{rank:05d}.pt"


class Replicated:
    """ddp, and a single process: the model whole on every process."""

    autocast = True
    """Whether the module computes under bf16 autocast (with train.precision bf16)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process

    def wrap(self, loss: nn.Module) -> Callable:
        return self.accelerator.prepare_model(loss)

    def unwrap(self, wrapped) -> nn.Module:
        return self.accelerator.unwrap_model(wrapped)

    def no_sync(self, wrapped, last: bool):
        """Around a micro-batch: gradients are averaged over the processes only after the last one."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(wrapped)

    def finish_gradients(self, method: Method) -> None:
        """After the backward passes of a step, before clipping (the row masks are gradient hooks here)."""

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()

    @contextlib.contextmanager
    def gathered(self, method: Method, on_device: bool = False, wanted: bool = True) -> Iterator[Method | None]:
        """The method with its whole weights on the main process (the live one here), None on the others and when
        the main process does not want it (`wanted`, as the main process says). Under fsdp every process must
        enter it (the weights are gathered)."""
        yield method if self.main and wanted else None

    def save_checkpoint(self, run: RunDir, step: int, method: Method | None, tokenizer, optimizer,
                        trainer_state: dict, keep: int, ema: EMA | None, write_more: Callable[[Path], None]) -> None:
        """Called by every process with `gathered`'s method; here the main process writes it all."""
        if not self.main:
            return

        def more(folder: Path) -> None:
            write_more(folder)
            if ema is not None:
                ema.save(folder)

        save_checkpoint(run, step, method.export_model(), tokenizer, optimizer, trainer_state, keep=keep,
                        write_more=more)

    def restore(self, folder: Path, ema: EMA | None) -> Any:
        """Restore a checkpoint's random states and EMA (the weights were loaded with the method); returns the
        optimizer state for `load_optimizer`."""
        training_state = load_training_state(folder)[1]
        restore_rng_states(training_state)
        if ema is not None:
            ema.load(folder)
        return training_state["optimizer"]

    def load_optimizer(self, optimizer: torch.optim.Optimizer, saved: Any) -> None:
        optimizer.load_state_dict(saved)

    def close(self) -> None:
        """After training (also after an error)."""


class _Root(nn.Module):
    """FSDP's root unit: holds the model, and runs the loss module given to it inside its own forward, so that
    the weights outside the blocks are gathered for the whole loss (the chunked loss uses the head's weight
    directly) and FSDP's backward bookkeeping starts from the loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, loss: nn.Module, *args, **kwargs) -> torch.Tensor:
        return loss(*args, **kwargs)


class _Bound:
    """The root with the phase's loss module: called like the loss module."""

    def __init__(self, root: _Root, loss: nn.Module):
        self.root, self.loss = root, loss

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.root(self.loss, *args, **kwargs)


class FullyShard(Replicated):
    """fsdp: FSDP2 over all the processes (a group of one when there is one process)."""

    def __init__(self, method: Method, cfg: TrainConfig, accelerator):
        super().__init__(accelerator)
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        device = accelerator.device
        cuda = device.type == "cuda"
        self.own_group = not dist.is_initialized()
        if self.own_group:  # one process: FSDP and the sharded checkpoints still want a group (of one)
            dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        settings = cfg.distributed
        self.autocast = not (cuda and cfg.precision == "bf16")
        mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if not self.autocast \
            else MixedPrecisionPolicy()
        if settings.cpu_offload and not cuda:
            log("train.distributed.cpu_offload: the model is in CPU memory already; nothing to offload")
        offload = CPUOffloadPolicy() if settings.cpu_offload and cuda else OffloadPolicy()
        mesh = init_device_mesh(device.type, (self.world,))
        blocks = method.model.get_submodule(_blocks(method.model)[0])
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=settings.reshard_after_forward, mp_policy=mixed,
                        offload_policy=offload)
        # the root keeps its weights from forward to backward (torch's default for it): they are needed at once
        self.root = fully_shard(_Root(method.model), mesh=mesh, mp_policy=mixed, offload_policy=offload)
        method.parameters_replaced()
        method.row_hooks = False
        log(f"train: FSDP over {self.world} process(es), {len(blocks)} blocks, "
            f"reshard_after_forward={settings.reshard_after_forward}"
            + (", bf16 mixed precision" if not self.autocast else "") + (", CPU offload" if cuda and
                                                                         settings.cpu_offload else ""))

    def wrap(self, loss: nn.Module) -> Callable:
        return _Bound(self.root, loss)

    def unwrap(self, wrapped: _Bound) -> nn.Module:
        return wrapped.loss

    def no_sync(self, wrapped, last: bool):
        return contextlib.nullcontext()

    @torch.no_grad()
    def finish_gradients(self, method: Method) -> None:
        """Zero the gradient rows outside the new ones, on this process's shard."""
        rows = method.rows.new_rows if method.rows is not None else None
        for param in method.only_new_rows:
            if param.grad is not None:
                kept = local_rows(param.grad, rows.start, rows.stop).clone()
                param.grad.to_local().zero_()
                local_rows(param.grad, rows.start, rows.stop).copy_(kept)

    @torch.no_grad()
    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """torch's clip_grad_norm_ on the shards: the squared norms of this process's shards, summed over the
        processes on the device the group communicates on (with cpu_offload the shards are in CPU memory, which a
        group of CUDA devices cannot reduce)."""
        import torch.distributed as dist

        grads = [p.grad.to_local() for p in params if p.grad is not None]
        square = torch.zeros((), dtype=torch.float32, device=self.accelerator.device)
        if grads:
            square += torch.stack(torch._foreach_norm(grads)).float().square().sum().to(square.device)
        dist.all_reduce(square)
        norm = square.sqrt()
        if grads:
            torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0).to(grads[0].device))
        return norm.item()

    @contextlib.contextmanager
    def gathered(self, method: Method, on_device: bool = False, wanted: bool = True) -> Iterator[Method | None]:
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        said = [wanted]
        dist.broadcast_object_list(said, src=0)  # (evaluation: only the main process knows it has sets to score)
        if not said[0]:
            yield None
            return
        state = get_model_state_dict(self.root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.main:
            yield None
            return
        whole = _unsharded_copy(method, {name.removeprefix("model."): t for name, t in state.items()})
        del state
        if on_device:
            whole.model.to(self.accelerator.device)
        try:
            yield whole
        finally:
            del whole
            gc.collect()  # (transformers and peft models hold reference cycles: free the whole model now)

    def save_checkpoint(self, run: RunDir, step: int, method: Method | None, tokenizer, optimizer,
                        trainer_state: dict, keep: int, ema: EMA | None, write_more: Callable[[Path], None]) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        shards = self._state(optimizer, ema)

        def write_shards(folder: Path | None) -> None:
            """Every process: its shards and random state, into the main process's temporary folder."""
            where = [folder]
            dist.broadcast_object_list(where, src=0)
            dcp.save(shards, checkpoint_id=where[0] / DCP_DIR)
            torch.save(rng_states(), where[0] / rng_file(self.rank))
            dist.barrier()  # all written before the main process lists them in the manifest

        if self.main:
            save_checkpoint(run, step, method.export_model(), tokenizer, None, trainer_state, keep=keep,
                            write_more=write_more, training_state=write_shards)
        else:
            write_shards(None)

    def restore(self, folder: Path, ema: EMA | None) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = self._state(None, ema)
        dcp.load(state, checkpoint_id=folder / DCP_DIR)  # into this run's shards, whatever the saved sharding
        # dcp.load reads in place and refuses a checkpoint that lacks any of them; strict=False: a tied name left out
        set_model_state_dict(self.root, state["model"], options=StateDictOptions(strict=False))
        own = folder / rng_file(self.rank)
        restore_rng_states(torch.load(own if own.is_file() else folder / rng_file(0), weights_only=True))
        return folder

    def load_optimizer(self, optimizer: torch.optim.Optimizer, saved: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = {"optimizer": self._state(optimizer, None)["optimizer"]}
        dcp.load(state, checkpoint_id=saved / DCP_DIR)
        set_optimizer_state_dict(self.root, optimizer, state["optimizer"])

    def close(self) -> None:
        import torch.distributed as dist

        if self.own_group and dist.is_initialized():
            dist.destroy_process_group()

    def _state(self, optimizer: torch.optim.Optimizer | None, ema: EMA | None) -> dict:
        """What the sharded checkpoint holds, as torch.distributed.checkpoint reads and writes it: the model's
        sharded weights by name, the optimizer's state by parameter name, the EMA's shadows by name."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model = get_model_state_dict(self.root)
        first: dict[int, str] = {}  # a tied weight (the embeddings and the head) once, under its first name
        for name, param in self.root.named_parameters(remove_duplicate=False):
            if first.setdefault(id(param), name) != name:
                model.pop(name, None)
        state: dict = {"model": model}
        if optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(self.root, optimizer)
        if ema is not None:
            state["ema"] = dict(zip(ema.names, ema.shadow))
        return state


def _unsharded_copy(method: Method, state: dict[str, torch.Tensor]) -> Method:
    """A Method like `method` on a plain (unsharded) model holding `state` (the gathered weights): the same class
    and config, its parameters created on the meta device and then given the gathered tensors (no copy), tied
    weights (embeddings and head) tied again as in `method`'s model."""
    from accelerate import init_empty_weights

    base = method.model.get_base_model() if method.peft else method.model
    # parameters on the meta device, buffers (rotary frequencies) computed for real; the random state untouched,
    # so that the main process keeps drawing what the others draw
    with torch.random.fork_rng(devices=[]):
        with init_empty_weights():
            model = type(base)(copy.deepcopy(base.config))
        model.generation_config = copy.deepcopy(base.generation_config)
        model.tie_weights()  # (not inside init_empty_weights, which re-creates an assigned parameter)
        with init_empty_weights():  # the adapters, which look at whether the head is tied
            whole = Method(model, method.cfg, method.rows)
    first: dict[int, str] = {}
    aliases = []  # (name, name of the parameter it is)
    for name, param in method.model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            aliases.append((name, first[id(param)]))
    for name, _ in aliases:
        state.pop(name, None)
    _, unexpected = whole.model.load_state_dict(state, strict=False, assign=True)
    for name, source in aliases:
        owner, attribute = name.rsplit(".", 1)
        setattr(whole.model.get_submodule(owner), attribute, whole.model.get_parameter(source))
    live_buffers = dict(method.model.named_buffers())
    for name, buffer in list(whole.model.named_buffers()):
        if buffer.is_meta:  # one made from a weight under init_empty_weights (peft's original token rows)
            owner, attribute = name.rsplit(".", 1)
            setattr(whole.model.get_submodule(owner), attribute, live_buffers[name].detach().clone())
    left = [name for name, p in whole.model.named_parameters() if p.is_meta]
    if left or unexpected:
        raise RuntimeError(f"gathering the sharded model: {len(left)} parameters not gathered ({left[:3]}), "
                           f"{len(unexpected)} unexpected ({unexpected[:3]})")
    whole.model.train(method.model.training)
    return whole
