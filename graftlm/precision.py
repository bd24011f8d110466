"""bfloat16 where this device computes it fast, float32 elsewhere: what `train.precision: auto` and
`eval.dtype: auto` become.

A CPU without bf16 instructions (AVX2 only: most laptops before 2023, many cloud machines) computes a bf16 matrix
product through a slow fallback, about a hundred times slower than float32 (0.8 against 98 GFLOP/s measured on 2
AVX2 cores); with AVX512-BF16 or AMX, bf16 is 2-3 times faster than float32. So the choice is measured, not guessed
from the CPU's name: one small product in each precision, timed a few times, interleaved (under a second on the slow
path, milliseconds otherwise), once per process and device type; bf16 unless it is more than twice as slow. On
CUDA: bf16 where the GPU supports it (Ampere and later).
"""

from __future__ import annotations

import functools
import time


def train_precision(setting: str, device) -> str:
    """`train.precision` as training applies it: "bf16" or "fp32"."""
    if setting != "auto":
        return setting
    return "bf16" if fast_bf16(_device_type(device)) else "fp32"


def eval_dtype(setting: str, device) -> str:
    """`eval.dtype` as scoring applies it: "bfloat16" or "float32"."""
    if setting != "auto":
        return setting
    return "bfloat16" if fast_bf16(_device_type(device)) else "float32"


@functools.cache
def fast_bf16(device_type: str = "cpu") -> bool:
    """Whether bf16 autocast is the faster way to multiply matrices on this device type."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    # Twice as slow, not merely slower: what the choice must catch is the fallback a hundred times slower, and a
    # busy machine (another job on the same cores) can turn a 2-3x lead of bf16 into a small loss in one timing.
    bf16, fp32 = _seconds_per_product()
    return bf16 <= 2 * fp32


def _seconds_per_product() -> tuple[float, float]:
    """The best of several timings of one product under bf16 autocast and in fp32, interleaved, so that a busy
    machine (another job on the same cores) slows both alike rather than one of them."""
    import torch

    generator = torch.Generator().manual_seed(0)  # (the global generators, which training seeds, are left alone)
    a, b = torch.randn(384, 384, generator=generator), torch.randn(384, 384, generator=generator)
    best = {True: float("inf"), False: float("inf")}
    with torch.no_grad():
        for repeat in range(5):
            for bf16 in (True, False):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    started = time.perf_counter()
                    torch.matmul(a, b)
                    if repeat:  # the first of each: kernel selection, page faults
                        best[bf16] = min(best[bf16], time.perf_counter() - started)
    return best[True], best[False]


def _device_type(device) -> str:
    return device if isinstance(device, str) else device.type
