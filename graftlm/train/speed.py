"""How fast a training step runs: the model-level settings of `train:` that change speed, not what is learned.

    model = prepare_for_speed(model, cfg, device)     # after the model is built, before DDP wraps it
    with weight_casts_per_step(cfg, device):          # around the micro-batches of one optimizer step
        for micro in micro_batches: ...forward under autocast, backward...
    tokens = to_device(batch, device)                 # pinned, asynchronous copy on CUDA

- `train.attention`: the attention kernel. `auto` keeps the model's scaled-dot-product attention (SDPA) and lets
  torch pick a kernel per call (on CPU its flash kernel: measured fastest in bf16 at seq 512, bench/attention.py);
  `flash`, `efficient`, `math`, `cudnn` restrict SDPA to one kernel (an error where it cannot run the call);
  `eager` is transformers' own matmul and softmax.
- `train.compile`: torch.compile of each transformer block (the blocks share one compiled graph). Compiled code
  goes to a persistent cache (TORCHINDUCTOR_CACHE_DIR, default ~/.cache/graftlm/torch-compile), so only the first
  run of a shape pays the compilation. `auto`: on CUDA only; it changes rounding (fused elementwise kernels), so it
  is off where runs must repeat the uncompiled ones bit for bit.
- `train.threads`: torch's CPU threads.
- Deterministic mode without NaN-filling every new tensor (the same numbers, a pass over memory less).
- bf16 casts once per step: under autocast each micro-batch casts every fp32 weight to bf16 again; autocast's cast
  cache lives as long as the outermost autocast block, so one block around the step's micro-batches casts each
  trained weight once per optimizer step. Bit-identical (the weights do not change between micro-batches).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from graftlm.errors import GraftError

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from graftlm.train.config import TrainConfig

SDPA_KERNELS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH",
                "cudnn": "CUDNN_ATTENTION"}
"""`train.attention` values that restrict SDPA to one kernel, and torch's name for it."""
CUDA_ONLY_KERNELS = ("efficient", "cudnn")
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def prepare_for_speed(model: "nn.Module", cfg: "TrainConfig", device: torch.device) -> "nn.Module":
    """Apply `train.threads`, `train.attention` and `train.compile` to a model (a transformers model, possibly
    inside peft); returns it. Parameter names and the state dict do not change, so checkpoints are unaffected."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    # Deterministic mode (train.deterministic) fills every new uninitialised tensor with NaN, a debugging aid: a
    # kernel that read such memory would be a bug either way. Not filling is the same numbers for less work.
    torch.utils.deterministic.fill_uninitialized_memory = False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft keeps the model inside
    if cfg.attention in CUDA_ONLY_KERNELS and device.type != "cuda":
        raise GraftError(f"train.attention: {cfg.attention} is a CUDA kernel and this run is on {device.type}; "
                         "use auto (on CPU: flash) or math")
    if cfg.attention != "auto":
        base.set_attn_implementation(_attention_implementation(cfg.attention))
    if compile_enabled(cfg, device):
        _compile_blocks(base)
    return model


def compile_enabled(cfg: "TrainConfig", device: torch.device) -> bool:
    return device.type == "cuda" if cfg.compile == "auto" else bool(cfg.compile)


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


def _attention_implementation(name: str) -> str:
    """The transformers attention implementation for `train.attention`: registered on first use for an SDPA kernel."""
    if name not in SDPA_KERNELS:
        return name  # eager
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    # transformers takes any implementation named "*flash*" for a flash-attn package
    registered = f"graftlm_sdpa_{name}".replace("flash", "fa")
    if registered not in AttentionInterface._global_mapping:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_KERNELS[name])

        def attention(*args, **kwargs):
            with sdpa_kernel([backend]):
                return sdpa_attention_forward(*args, **kwargs)

        AttentionInterface.register(registered, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(registered, sdpa_mask)
    return registered


def _compile_blocks(model: "nn.Module") -> None:
    """torch.compile each transformer block in place (`Module.compile`: names and state dict unchanged)."""
    os.environ.setdefault(COMPILE_CACHE_ENV, str(compile_cache_dir()))
    blocks = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    if not isinstance(blocks, torch.nn.ModuleList) or not len(blocks):
        raise GraftError(f"train.compile: {type(model).__name__} has no list of transformer blocks "
                         "(`model.get_decoder().layers`) to compile; set train.compile: false")
    for block in blocks:
        block.compile()


def compile_cache_dir() -> Path:
    """Where compiled kernels are kept between runs (unless TORCHINDUCTOR_CACHE_DIR says otherwise)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "graftlm" / "torch-compile"
