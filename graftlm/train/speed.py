"""How fast a training step runs: the model-level settings of `train:` that change speed, not what is learned.

    model = prepare_for_speed(model, cfg, device)     # after the model is built, before DDP wraps it
    with weight_casts_per_step(cfg, device):          # around the micro-batches of one optimizer step
        for micro in micro_batches: ...forward under autocast, backward...
    tokens = to_device(batch, device)                 # pinned, asynchronous copy on CUDA

- `train.attention`: the attention kernel. `auto` chooses by device and precision (`auto_attention`): `matmul` on
  a CPU in bf16, elsewhere the model's scaled-dot-product attention (SDPA) on the kernel torch picks per call (flash
  on a CPU in fp32, flash or cuDNN on CUDA). `flash`, `efficient`, `math`, `cudnn` restrict SDPA to one kernel (an
  error where it cannot run the call); `eager` is transformers' own matmul and softmax; `matmul` the same maths
  without its copies (`matmul_attention`).
- `train.compile`: torch.compile of each transformer block (the blocks share one compiled graph). Compiled code
  goes to a persistent cache (TORCHINDUCTOR_CACHE_DIR, default ~/.cache/graftlm/torch-compile), so only the first
  run of a shape pays the compilation. `auto`: on CUDA; on a CPU in bf16 where it pays (`compile_enabled`), and
  there a block that fails to compile runs eagerly instead. It changes rounding (fused elementwise kernels), so a
  compiled run does not repeat an eager one bit for bit (`compile: false` keeps them eager).
- `train.threads`: torch's CPU threads.
- Deterministic mode without NaN-filling every new tensor (the same numbers, a pass over memory less).
- bf16 casts once per step: under autocast each micro-batch casts every fp32 weight to bf16 again; autocast's cast
  cache lives as long as the outermost autocast block, so one block around the step's micro-batches casts each
  trained weight once per optimizer step. Bit-identical (the weights do not change between micro-batches).
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from graftlm.errors import GraftError
from graftlm.progress import log

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from graftlm.train.config import TrainConfig

SDPA_KERNELS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH",
                "cudnn": "CUDNN_ATTENTION"}
"""`train.attention` values that restrict SDPA to one kernel, and torch's name for it."""
CUDA_ONLY_KERNELS = ("efficient", "cudnn")
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
COMPILE_PAYS_S = 150.0
"""`compile: auto` on a CPU compiles a training estimated at this many seconds or more at the machine's measured
bf16 matmul rate (train/flops.py's CPU peak). Measured on 2 Zen 4 cores (SmolLM2-135M, seq 512): compiled steps
run 1.08-1.18x faster than eager ones, which reach ~60 % of that rate; the demo (~215 s at the rate, 24 steps)
pays ~50 s compiling on its first run (its first step 65.6 s against 15.7 eager) and ~22 s with the cache warm,
and still ends its steps 14 s (cold) and 27 s (warm) sooner than eager: about where compiling starts to pay."""
QUERY_BLOCK = 128
"""Queries per block of causal matmul attention. bench: forward + backward of SmolLM2's attention, batch 2, bf16
on Zen 4: at 512 tokens 28.0 ms in one block, 19.9 in 2, 16.5 in 4, 17.2 in 8; at 256, 8.0 / 5.1 / 5.7 in 1 / 2 / 4."""


def prepare_for_speed(model: "nn.Module", cfg: "TrainConfig", device: torch.device,
                      estimated_s: float | None = None) -> "nn.Module":
    """Apply `train.threads`, `train.attention` and `train.compile` to a model (a transformers model, possibly
    inside peft); returns it. Parameter names and the state dict do not change, so checkpoints are unaffected.
    `estimated_s`: the training's seconds at the device's peak, for `compile: auto` on a CPU (None: not a
    single-process training; auto does not compile there)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    # Deterministic mode (train.deterministic) fills every new uninitialised tensor with NaN, a debugging aid: a
    # kernel that read such memory would be a bug either way. Not filling is the same numbers for less work.
    torch.utils.deterministic.fill_uninitialized_memory = False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft keeps the model inside
    if cfg.attention in CUDA_ONLY_KERNELS and device.type != "cuda":
        raise GraftError(f"train.attention: {cfg.attention} is a CUDA kernel and this run is on {device.type}; "
                         "use auto (on CPU: flash) or math")
    attention, current = cfg.attention, base.config._attn_implementation
    if attention == "auto":  # a model that chose another implementation itself (eager for soft-capping) keeps it
        attention = auto_attention(cfg, device) if current == "sdpa" or current.startswith("graftlm_") else current
    implementation = _attention_implementation(attention)
    if implementation != current:
        base.set_attn_implementation(implementation)
    if compile_enabled(cfg, device, estimated_s):
        blocks = _blocks(base)
        if blocks is None:
            if cfg.compile == "auto":
                return model  # not a model of transformer blocks as transformers lays them out: left eager
            raise GraftError(f"train.compile: {type(base).__name__} has no list of transformer blocks "
                             "(`model.get_decoder().layers`) to compile; set train.compile: false")
        if cfg.compile == "auto" and device.type == "cpu":
            from torch import _dynamo

            _dynamo.config.suppress_errors = True  # a block inductor cannot compile runs eagerly
            log(f"train: compiling the blocks (compile: auto, ~{estimated_s / 60:.0f} min of training at this "
                "CPU's peak; the first step waits for the compilation, under a minute once cached; compile: false "
                "trains eagerly)")
        _compile_blocks(blocks)
    return model


def compile_enabled(cfg: "TrainConfig", device: torch.device, estimated_s: float | None = None) -> bool:
    """`train.compile` as set; auto: on CUDA, and on a CPU in bf16 with a C++ compiler (inductor's) for a
    single-process training of COMPILE_PAYS_S or more at the CPU's peak (`estimated_s`)."""
    if cfg.compile != "auto":
        return bool(cfg.compile)
    if device.type == "cuda":
        return True
    return (device.type == "cpu" and cfg.precision == "bf16" and estimated_s is not None
            and estimated_s >= COMPILE_PAYS_S and _has_cpp_compiler())


@functools.lru_cache(maxsize=1)
def _has_cpp_compiler() -> bool:
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # inductor's own error when its search finds none
        return False
    return True


def auto_attention(cfg: "TrainConfig", device: torch.device) -> str:
    """What `attention: auto` becomes: matmul on a CPU in bf16, sdpa (the model's own) everywhere else.
    bench/attention.py on Zen 4 (2 cores, AVX512-BF16), SmolLM2-135M's heads, batch 2, forward + backward in bf16:
    matmul 4.7 / 12.8 / 56.9 / 168 ms at 256 / 512 / 1,024 / 2,048 tokens, torch's CPU flash kernel 11.0 / 29.8 /
    75.7 / 231; in fp32 the two are within 5 % (8.3 against 8.1 ms at 256, 288 against 273 at 2,048)."""
    if device.type == "cpu" and cfg.precision == "bf16":
        return "matmul"
    return "sdpa"


def weight_casts_per_step(cfg: "TrainConfig", device: torch.device):
    """An autocast block for one optimizer step's micro-batches: inside it, autocast casts each trained fp32 weight
    to bf16 once and reuses the cast in every micro-batch. The micro-batches keep their own autocast blocks (nested
    blocks share the outermost one's cache). A no-op block under fp32."""
    if cfg.precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def to_device(array: "np.ndarray", device: torch.device) -> torch.Tensor:
    """A numpy batch as a tensor on `device`: on CUDA through pinned memory, copied asynchronously (the copy is
    ordered before any kernel that reads it on the same stream)."""
    tensor = torch.from_numpy(array)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def matmul_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """Attention as two matrix products and a softmax (`train.attention: matmul`), written for a CPU in bf16: the
    query heads that share a key/value head are one product against it (no copies of the keys and values), the
    scale applies to the queries (64 numbers per token, not 512 scores), the mask is written into the scores in
    place, the softmax returns the scores' own dtype, and under a causal mask each block of `QUERY_BLOCK` queries is
    multiplied only with the keys up to its last position (5/8 of the products at 512 tokens).
    Transformers' eager attention does the same maths with the keys and values repeated per head, an fp32 mask
    added (the scores promoted to fp32), an fp32 softmax cast back, and every query against every key. The mask is
    transformers' SDPA mask: None (causal, nothing padded) or True where a query may look."""
    if dropout and module.training:
        raise GraftError("train.attention: matmul has no attention dropout; use auto or eager")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise GraftError("train.attention: matmul has no soft-capping or attention sinks; use auto or eager")
    length, keys = query.shape[2], key.shape[2]
    scaled = query * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    causal = getattr(module, "is_causal", True)
    if attention_mask is None and causal and length == keys:
        edges = [*range(0, length, QUERY_BLOCK), length]
        output = torch.cat([_attend(scaled[:, :, start:end], key[:, :, :end], value[:, :, :end], None, True)
                            for start, end in zip(edges, edges[1:])], dim=2)
    else:
        output = _attend(scaled, key, value, attention_mask, causal)
    return output.transpose(1, 2).contiguous(), None


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
            causal: bool) -> torch.Tensor:
    """Scaled queries (batch, heads, length, dim) attending to the keys, whose last `length` positions are theirs;
    the output in the queries' shape. Without a mask: causal, or every query sees every key."""
    batch, heads, length, head_dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups * length, head_dim)  # row: group, then position
    scores = grouped @ key.transpose(-1, -2)
    # Outside autograd: a blocked score's probability is exactly 0, so the softmax's backward already gives it a zero
    # gradient (masked_fill's backward would only write those zeros again). The lowest finite number, not -inf: a
    # row with nothing allowed (a padded query) gets a uniform softmax, not NaN.
    by_group = scores.view(batch, kv_heads, groups, length, keys)
    with torch.no_grad():
        if attention_mask is not None:  # batch, 1, length, keys; the same for each head of a group
            by_group.masked_fill_(~attention_mask[:, :, None, :, -keys:], torch.finfo(scores.dtype).min)
        elif causal:  # only the queries' own positions (the last `length` keys) hold scores a query may not see
            later = torch.ones(length, length, dtype=torch.bool, device=query.device).triu_(1)
            by_group[..., keys - length:].masked_fill_(later, torch.finfo(scores.dtype).min)
    with torch.autocast(query.device.type, enabled=False):  # autocast would compute it in fp32 and cast it back
        probs = torch.softmax(scores, dim=-1)
    return (probs @ value).view(batch, heads, length, head_dim)


def _attention_implementation(name: str) -> str:
    """The transformers attention implementation for `train.attention`: registered on first use (with transformers'
    SDPA mask) for an SDPA kernel and for `matmul`."""
    if name not in SDPA_KERNELS and name != "matmul":
        return name  # eager, sdpa, or what a model chose for itself
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    # transformers takes any implementation named "*flash*" for a flash-attn package
    registered = "graftlm_matmul" if name == "matmul" else f"graftlm_sdpa_{name}".replace("flash", "fa")
    if registered not in AttentionInterface._global_mapping:
        AttentionInterface.register(registered, matmul_attention if name == "matmul" else _sdpa_on(name))
        ALL_MASK_ATTENTION_FUNCTIONS.register(registered, sdpa_mask)
    return registered


def _sdpa_on(kernel: str):
    """Transformers' SDPA attention function restricted to one SDPA kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    backend = getattr(SDPBackend, SDPA_KERNELS[kernel])

    def attention(*args, **kwargs):
        with sdpa_kernel([backend]):
            return sdpa_attention_forward(*args, **kwargs)

    return attention


def _blocks(model: "nn.Module") -> "torch.nn.ModuleList | None":
    """The model's transformer blocks (`model.get_decoder().layers`), or None."""
    blocks = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    return blocks if isinstance(blocks, torch.nn.ModuleList) and len(blocks) else None


def _compile_blocks(blocks: "torch.nn.ModuleList") -> None:
    """torch.compile each transformer block in place (`Module.compile`: names and state dict unchanged)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch writes its default (a folder in /tmp) into the environment as soon as anything asks for it (importing
    # transformers does): only a value the user set is kept
    if os.environ.get(COMPILE_CACHE_ENV) in (None, os.path.abspath(default_cache_dir())):
        os.environ[COMPILE_CACHE_ENV] = str(compile_cache_dir())
    for block in blocks:
        block.compile()


def compile_cache_dir() -> Path:
    """Where compiled kernels are kept between runs (unless TORCHINDUCTOR_CACHE_DIR says otherwise)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "graftlm" / "torch-compile"
