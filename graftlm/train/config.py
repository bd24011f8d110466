"""The `train:` recipe section."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from graftlm.config import Section
from graftlm.train.schedule import ScheduleConfig

Embeddings = Literal["none", "new_rows", "all"]


class LoraSettings(Section):
    """Low-rank adapters (peft) on the linear layers; the base weights stay frozen."""

    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names (`q_proj`, `v_proj`, ...) or `all-linear` (every linear layer but the output head)."""
    embeddings: Embeddings = "none"
    """Also train the input embeddings and output head: `all` (peft `modules_to_save`: trainable copies, saved in
    full), `new_rows` (peft `trainable_token_indices`: only the rows a vocabulary extension added, saved alone as
    those rows), `none`."""


class LayraSettings(Section):
    """Layer-Selective LoRA: adapters (with `train.lora`'s settings) only on the first and last blocks."""

    first: int = Field(default=2, ge=0)
    last: int = Field(default=2, ge=0)

    @model_validator(mode="after")
    def _some_blocks(self) -> "LayraSettings":
        if self.first + self.last == 0:
            raise ValueError("first + last must be at least 1")
        return self


class FreezeSettings(Section):
    """`method: freeze` trains only the parameters chosen here (the union of the three); the rest stays frozen."""

    layers: list[int | str] = []
    """Transformer blocks to train: indices (negative ones count from the end: -1 is the last) or ranges "2-5"."""
    patterns: list[str] = []
    """Regular expressions searched in parameter names (`mlp`, `layers\\.1[0-3]\\.self_attn`, `norm`)."""
    embeddings: Embeddings = "none"

    @field_validator("layers")
    @classmethod
    def _ranges(cls, layers: list[int | str]) -> list[int | str]:
        for item in layers:
            if isinstance(item, str) and not re.fullmatch(r"\d+-\d+", item.strip()):
                raise ValueError(f"expected an index or a range like '2-5', got {item!r}")
        return layers

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regular expression: {e}") from None
        return patterns


class DistillConfig(Section):
    """A KL term toward the frozen start model (the teacher, in bf16) on replay sequences."""

    weight: float = Field(default=1.0, ge=0)
    """The term is `weight · T² · KL(teacher ‖ student)` per token of a replay sequence, added to the loss."""
    temperature: float = Field(default=1.0, gt=0)
    sources: list[str] | None = None
    """The sources whose sequences are distilled; default: the replay sources (`Recipe.replay_sources`: those not in
    the target language)."""
    logit_swap: bool = False
    """Mix-CPT's logit-swap self-distillation: where the teacher's top token is not the actual next token, swap
    their logits, so the teacher keeps its distribution but is never wrong about the text."""


class EmaConfig(Section):
    """An exponential moving average of the trained weights, updated after every optimizer step."""

    decay: float = Field(default=0.999, gt=0, lt=1)
    """It starts at the start model: with `decay` d, weights from the last ~1/(1-d) steps dominate."""
    export: bool = True
    """Export (and evaluate last) the averaged weights instead of the last ones."""


class LrGroups(Section):
    """Learning-rate multipliers of parameter groups, applied to the lr of every phase (and its schedule)."""

    new_rows: float = Field(default=3.0, gt=0)
    """The rows a vocabulary extension added, in the input embeddings and the output head (peft: the trainable
    token rows of `train.lora.embeddings: new_rows`). Ignored when the start model has no new rows. 3: the best
    extended run of the README's sweep at both budgets (Vietnamese bpb and English bpb lower than at 1; 10 moved
    the rows 7-10x farther and ended where 1 did); measured on one language and one seed."""
    embeddings: float = Field(default=1.0, gt=0)
    """The other rows of the input embeddings and the output head (to keep them fixed instead, train only the new
    rows: a `train: new_rows` phase, or `train.freeze.embeddings: new_rows`)."""
    rest: float = Field(default=1.0, gt=0)
    """Everything else that trains: the transformer blocks, or the adapters of lora/layra."""


class DistributedConfig(Section):
    """How the processes of an `accelerate launch` (or torchrun) share the model (graftlm/train/sharding.py)."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """`ddp`: every process holds the whole model, its gradients and the optimizer state, and gradients are averaged;
    `fsdp`: FSDP2 (torch's `fully_shard`, one unit per transformer block): each process holds 1/N of the weights,
    gradients, optimizer state and moving average, and gathers a block's weights only while it computes with them.
    Checkpoints are then sharded (torch.distributed.checkpoint) and resume at another number of processes."""
    reshard_after_forward: bool = True
    """fsdp: free a block's gathered weights after its forward pass and gather them again for the backward pass
    (less memory, one more all-gather per block); false keeps them from forward to backward."""
    cpu_offload: bool = False
    """fsdp on CUDA: keep the sharded weights, gradients and optimizer state in CPU memory (the optimizer step runs
    on the CPU); a model on the CPU has nothing to offload."""

    @model_validator(mode="after")
    def _fsdp_options(self) -> "DistributedConfig":
        if self.strategy != "fsdp":
            for key, default in (("reshard_after_forward", True), ("cpu_offload", False)):
                if getattr(self, key) != default:
                    raise ValueError(f"{key} is an option of strategy fsdp (strategy is {self.strategy})")
        return self


class PhaseConfig(Section):
    """One phase of training: what it trains, for how long, at which learning rate."""

    train: Literal["embeddings", "new_rows", "all"] = "all"
    """`embeddings`: the input embeddings and the output head; `new_rows`: only their rows a vocabulary extension
    added (the base rows stay bit-identical); `all`: what `train.method` trains."""
    max_tokens: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    """The phase's length (every phase but the last; the last runs to the end of train.max_tokens/max_steps)."""
    lr: float | None = Field(default=None, gt=0)
    """The phase's peak lr (default: train.lr); each phase has a fresh optimizer and its own schedule."""
    schedule: ScheduleConfig | None = None
    """Default: train.schedule, over the phase's own steps."""


class TrainConfig(Section):
    seq_len: int = Field(default=512, ge=8)
    batch_tokens: int = Field(default=8192, ge=8)
    """Tokens per optimizer step: `batch_tokens / seq_len` sequences, in micro-batches (gradient accumulation)."""
    micro_batch_size: int = Field(default=2, ge=1)
    """Sequences per forward pass; lower it to save memory, the result does not change."""
    max_tokens: int | None = Field(default=300_000, ge=1)
    """Training length in tokens (rounded up to whole steps); `max_steps` wins when both are set."""
    max_steps: int | None = Field(default=None, ge=1)
    lr: float = Field(default=3.0e-4, gt=0)
    """The peak learning rate."""
    schedule: ScheduleConfig = ScheduleConfig()
    weight_decay: float = Field(default=0.1, ge=0)
    embeddings_weight_decay: float = Field(default=0.0, ge=0)
    """Weight decay of the input embeddings and the output head. Off by default: decoupled decay shrinks every
    row at every step whether or not its token was in the batch, so rows of tokens the training text seldom
    holds (most new tokens, and much of the base vocabulary under a narrow corpus) would only shrink, drifting
    from their pretrained or initialised values with no signal at all; a row's norm also sets its token's logit
    scale, which decay would lower for the rare tokens only."""
    lr_groups: LrGroups = LrGroups()
    """Multipliers of the lr for the new embedding rows, the other embedding rows and the rest, in every phase."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16: autocast with fp32 master weights; fp32: no autocast; auto: bf16 where the device computes it faster
    than fp32 (CUDA from Ampere on; a CPU with AVX512-BF16 or AMX), else fp32 (graftlm/precision.py measures it:
    a CPU without bf16 instructions runs bf16 products about a hundred times slower). The log's `train:` line
    says which it became."""
    loss: Literal["chunked", "standard", "liger"] = "chunked"
    """chunked: the output layer and cross-entropy run a chunk of tokens at a time, never holding all logits;
    standard: the model's own logits, then cross-entropy; liger: Liger Kernel's fused linear cross-entropy (CUDA
    only, `pip install liger-kernel`; no distillation)."""
    loss_vocab_chunk: int | None = Field(default=None, ge=64, multiple_of=64)
    """chunked loss: the output layer's two products that keep the vocabulary as an output dimension run this many
    vocabulary rows at a time (null: all at once). Each number is the same dot product either way (bit-identical in
    the CPU cases tested, not guaranteed by every matmul library); only the speed differs."""
    attention: Literal["auto", "flash", "efficient", "math", "cudnn", "eager", "matmul"] = "auto"
    """The attention kernel (graftlm/train/speed.py): auto: matmul on a CPU in bf16 (measured 1.4-2.3x faster than
    torch's CPU flash kernel there), elsewhere scaled-dot-product attention (SDPA) on the kernel torch picks per
    call; flash, efficient, math, cudnn: SDPA on that kernel only; eager: transformers' matmul + softmax; matmul:
    the same maths without its copies, and causal blocks of queries against the keys before them only (graftlm's).
    Kernels round differently: a run repeats another bit for bit only on the same kernel."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile each transformer block (compiled code is cached between runs); auto: on CUDA, and on a CPU in
    bf16 with a C++ compiler for a single-process training long enough to win back the compilation (150 s or more
    at the CPU's measured peak, graftlm/train/speed.py). It changes rounding, so a compiled run does not repeat an
    uncompiled one bit for bit: false keeps a run eager."""
    threads: int | None = Field(default=None, ge=1)
    """CPU threads for torch's kernels (torch.set_num_threads); null: torch's default, one per physical core."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    seed: int = 0
    checkpoint_every: int = Field(default=100, ge=0)
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    max_bad_steps: int = Field(default=5, ge=1)
    """A NaN or inf loss skips its update; this many in a row stop the run."""
    deterministic: bool = True
    """Deterministic kernels, so that a resumed run repeats an uninterrupted one bit for bit (on CPU)."""
    method: Literal["full", "lora", "layra", "freeze"] = "full"
    """What learns: every weight (`full`), low-rank adapters on every block (`lora`) or on the first and last
    blocks only (`layra`), or the parameters `train.freeze` chooses (`freeze`)."""
    lora: LoraSettings = LoraSettings()
    layra: LayraSettings = LayraSettings()
    freeze: FreezeSettings = FreezeSettings()
    distill: DistillConfig | None = None
    """Distillation toward the start model on replay sequences; absent (null): none."""
    ema: EmaConfig | None = None
    """An exponential moving average of the weights; absent (null): none."""
    distributed: DistributedConfig = DistributedConfig()
    """With several processes: replicate the model (ddp) or shard it (fsdp)."""
    phases: list[PhaseConfig] = []
    """Phases trained one after the other (embeddings first, then everything); empty: one phase, `all`.
    `stages` is the older name of this key, still read."""

    @model_validator(mode="before")
    @classmethod
    def _stages_is_phases(cls, data: Any) -> Any:
        if isinstance(data, dict) and "stages" in data:
            data = dict(data)
            stages = data.pop("stages")
            if data.get("phases") not in (None, [], stages):
                raise ValueError("stages is the older name of phases: give one of them")
            data["phases"] = stages
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.batch_tokens % self.seq_len:
            raise ValueError(f"batch_tokens ({self.batch_tokens}) must be a multiple of seq_len ({self.seq_len})")
        if self.max_tokens is None and self.max_steps is None:
            raise ValueError("set max_tokens or max_steps")
        if self.loss == "liger" and self.distill is not None:
            raise ValueError("loss liger cannot add the distillation term; use loss: chunked with distill")
        if self.method == "freeze" and not (self.freeze.layers or self.freeze.patterns
                                            or self.freeze.embeddings != "none"):
            raise ValueError("method freeze: choose what trains with freeze.layers, freeze.patterns or "
                             "freeze.embeddings")
        for i, phase in enumerate(self.phases):
            last = i == len(self.phases) - 1
            if last and (phase.max_tokens or phase.max_steps):
                raise ValueError(f"phases.{i}: the last phase runs to the end of train.max_tokens/max_steps; "
                                 "leave its max_tokens and max_steps out")
            if not last and not (phase.max_tokens or phase.max_steps):
                raise ValueError(f"phases.{i}: set max_tokens or max_steps (only the last phase runs to the end)")
        if self.phases and self.phase_steps()[-1] < 1:
            raise ValueError(f"phases: the phases before the last take {sum(self.phase_steps()[:-1])} steps, "
                             f"the whole training {self.total_steps}: nothing is left for the last")
        return self

    @property
    def sequences_per_step(self) -> int:
        return self.batch_tokens // self.seq_len

    @property
    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return math.ceil(self.max_tokens / self.batch_tokens)

    def phase_steps(self) -> list[int]:
        """Optimizer steps of each phase (one phase of every step when `phases` is empty)."""
        steps = [p.max_steps or math.ceil(p.max_tokens / self.batch_tokens) for p in self.phases[:-1]]
        return steps + [self.total_steps - sum(steps)]
