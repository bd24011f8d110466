"""Throughput figures of a training run: model FLOPs per token, the device's bf16 peak, MFU and memory per process.

Model FLOPs per token of training (forward and backward, PaLM's appendix B convention, also torchtitan's):

    flops_per_token = 6·N + 12·L·H·Q·T

- N: the weights of every matrix multiplication of the model: each linear layer of the blocks (attention q/k/v/o,
  MLP gate/up/down; GPT-2's Conv1D alike) and the output projection (vocabulary × hidden), counted once even when
  tied to the input embedding. Not counted: the input embedding (a lookup, no multiplication), norms and biases
  (elementwise, under 0.1 % of the FLOPs). 6 = 2 FLOPs per multiply-add × (1 forward + 2 backward).
- 12·L·H·Q·T: attention's two sequence-long products (Q·Kᵀ and scores·V), 2·2·H·Q·T FLOPs per token and layer in
  the forward, ×3 with the backward; L layers, H query heads (grouped K/V heads do not shrink it), Q head
  dimension, T the training sequence length. The causal mask is not discounted (PaLM's choice).

The same model FLOPs are counted whatever is trained (full, LoRA, embeddings only): MFU says how much of the
device's arithmetic went into the model's forward and backward, not how much a method saves. A mixture of experts
would count every expert here, not the routed ones.

MFU = tokens/s × flops_per_token / peak FLOP/s. CUDA peaks: the dense bf16 tensor-core figures of the vendors'
datasheets (table below). CPU: measured here (a bf16 matmul under autocast, a second of work) and cached per CPU
model, torch version and thread count, since no datasheet says what torch reaches on a given CPU.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

CUDA_BF16_PEAK_TFLOPS: list[tuple[str, float, str]] = [
    # (pattern of torch.cuda.get_device_name(), dense bf16 TFLOP/s, source); the first pattern that matches wins.
    # NVIDIA datasheets give bf16 "with sparsity" (2:4); the dense figure is half of it.
    (r"H200 NVL", 835.5, "NVIDIA H200 NVL datasheet: BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    (r"(?<!G)H200", 989.5, "NVIDIA H200 datasheet (SXM): BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    (r"H100 NVL", 835.5, "NVIDIA H100 datasheet, H100 NVL: BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    (r"H100 PCIe", 756.5, "NVIDIA H100 datasheet, H100 PCIe: BF16 Tensor Core 1,513 TFLOPS with sparsity"),
    (r"H100|H800|GH200", 989.5, "NVIDIA H100 datasheet, H100 SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity "
                                "(GH200 datasheet: the same)"),
    (r"B200", 2250.0, "NVIDIA DGX B200 / HGX B200 datasheet: BF16 Tensor Core 4.5 PFLOPS with sparsity per GPU"),
    (r"A100|A800", 312.0, "NVIDIA A100 datasheet (SXM and PCIe): BF16 Tensor Core 312 TFLOPS (624 with sparsity)"),
    (r"L40S", 362.05, "NVIDIA L40S datasheet: BF16 Tensor Core 362.05 TFLOPS (733 with sparsity)"),
    (r"L40\b", 181.05, "NVIDIA L40 datasheet: BF16 Tensor Core 181.05 TFLOPS (362.1 with sparsity)"),
    (r"\bL4\b", 121.0, "NVIDIA L4 datasheet: BF16 Tensor Core 242 TFLOPS with sparsity"),
    (r"\bA40\b", 149.7, "NVIDIA A40 datasheet: BF16 Tensor Core 149.7 TFLOPS (299.4 with sparsity)"),
    (r"\bA10\b", 125.0, "NVIDIA A10 datasheet: BF16 Tensor Core 125 TFLOPS (250 with sparsity)"),
    (r"RTX 4090", 165.2, "NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: peak BF16 Tensor "
                         "TFLOPS with FP32 accumulate 165.2 (330.4 with sparsity)"),
    (r"RTX 3090", 71.0, "NVIDIA Ampere GA102 whitepaper, GeForce RTX 3090: peak BF16 Tensor TFLOPS with FP32 "
                        "accumulate 71 (142 with sparsity)"),
    (r"MI300X", 1307.4, "AMD Instinct MI300X datasheet: peak BF16 1307.4 TFLOPS (dense)"),
]
"""Devices without bf16 tensor cores (V100, T4) are absent: their MFU is not reported."""

CPU_SHAPES = [(1024, 1024, 1024), (2048, 2048, 2048), (4096, 1024, 4096)]
"""(m, k, n) of the matrix products timed on a CPU: square and the wide-and-flat shape of an MLP projection."""
CPU_SECONDS_PER_SHAPE = 0.3


# ---- FLOPs per token ------------------------------------------------------------------------------------------


def matmul_params(model: torch.nn.Module) -> int:
    """N: the weights of the model's linear layers (the output projection included, once, even when tied)."""
    from transformers.pytorch_utils import Conv1D

    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def attention_shape(config) -> tuple[int, int, int]:
    """(L layers, H query heads, Q head dimension) of a transformers config."""
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(config, "num_attention_heads", "n_head")
    head_dim = getattr(config, "head_dim", None) or _first(config, "hidden_size", "n_embd") // heads
    return layers, heads, head_dim


def flops_per_token(config, seq_len: int, model: torch.nn.Module | None = None) -> int:
    """Training FLOPs per token, 6·N + 12·L·H·Q·T (see the module's docstring). Without `model`, the model is
    built from `config` on the meta device (no memory, no weights) to count N."""
    if model is None:
        model = _meta_model(config)
    layers, heads, head_dim = attention_shape(config)
    return 6 * matmul_params(model) + 12 * layers * heads * head_dim * seq_len


def _meta_model(config) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def _first(config, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ValueError(f"{type(config).__name__} has none of {', '.join(names)}")


# ---- the device's peak ----------------------------------------------------------------------------------------


def cuda_peak_flops(name: str) -> float | None:
    """The dense bf16 peak (FLOP/s) of a CUDA device from its name, or None for a device not in the table."""
    for pattern, tflops, _source in CUDA_BF16_PEAK_TFLOPS:
        if re.search(pattern, name):
            return tflops * 1e12
    return None


def peak_flops(device: torch.device | str = "cpu", refresh: bool = False, bf16: bool = True) -> float | None:
    """The peak (FLOP/s) of one process's device: the bf16 table's for CUDA (None when the device is unknown or
    has no bf16 tensor cores, or `bf16` is off), measured and cached for a CPU with this process's thread count,
    under bf16 autocast or in fp32 (`bf16`: the training's precision).

    For a run of several processes, add up the processes' peaks: on one CPU machine that assumes their threads do
    not share cores (torchrun and `accelerate launch` give each process one thread unless told otherwise)."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_peak_flops(torch.cuda.get_device_name(device)) if bf16 else None
    if device.type != "cpu":
        return None
    return cpu_peak_flops(refresh=refresh, bf16=bf16)


def cpu_peak_flops(refresh: bool = False, bf16: bool = True) -> float:
    """The best matmul rate (FLOP/s) torch reaches on this CPU with this process's threads, under bf16 autocast
    (or in fp32), measured once (about a second) and cached in `<cache dir>/cpu_bf16_peak.json` under the CPU
    model, torch version, thread count (and ` | fp32`). A measurement on a busy machine comes out low:
    `refresh=True` measures again."""
    path = cache_dir() / "cpu_bf16_peak.json"
    key = cpu_key() + ("" if bf16 else " | fp32")
    table = _read_json(path)
    if not refresh and isinstance(table.get(key), dict) and table[key].get("flops", 0) > 0:
        return float(table[key]["flops"])
    flops = measure_cpu_matmul_flops(bf16=bf16)
    table[key] = {"flops": flops, "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                  "shapes": CPU_SHAPES}
    _write_json(path, table)
    return flops


def measure_cpu_matmul_flops(shapes=None, seconds: float | None = None, bf16: bool = True) -> float:
    """The best rate of fp32 products under bf16 autocast (what a training step's linear layers do on a CPU), or
    in fp32. The shapes are timed smallest first; once one product takes longer than `seconds` (a CPU without
    bf16 instructions: minutes for the largest), the larger ones are left out."""
    shapes, seconds = shapes or CPU_SHAPES, seconds or CPU_SECONDS_PER_SHAPE
    best = 0.0
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for m, k, n in sorted(shapes, key=lambda shape: shape[0] * shape[1] * shape[2]):
            if best and 2 * m * k * n / best > seconds:
                break
            a = torch.randn(m, k, generator=generator)
            b = torch.randn(k, n, generator=generator)
            torch.matmul(a, b)  # warm-up: kernel selection, page faults
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                tick = time.perf_counter()
                torch.matmul(a, b)
                best = max(best, 2 * m * k * n / (time.perf_counter() - tick))
    return best


def cpu_key() -> str:
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cache_dir() -> Path:
    """graftlm's per-user cache: $GRAFT_CACHE_DIR, else $XDG_CACHE_HOME/graftlm, else ~/.cache/graftlm."""
    if os.environ.get("GRAFT_CACHE_DIR"):
        return Path(os.environ["GRAFT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graftlm"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # absent or damaged: measured again
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    from graftlm.runs import write_json_atomic

    try:
        write_json_atomic(path, data)
    except OSError:
        pass  # a read-only home: measured again next time


# ---- MFU and memory -------------------------------------------------------------------------------------------


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: the fraction of `peak` (FLOP/s of the devices that made `tokens_per_s`) spent on
    the model's training FLOPs. None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / peak


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """This process's peak memory: allocated by torch on a CUDA device, resident (RSS) on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
