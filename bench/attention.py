"""Attention kernels for training: forward + backward time of each `train.attention` choice, per dtype and sequence
length, on SmolLM2-135M's attention shape (9 query heads, 3 key/value heads, head dim 64), in one run.

    .venv/bin/python bench/attention.py [--device cpu] [--dtypes bfloat16,float32] [--seq-lens 512,2048]
        [--batch 2] [--rounds 3]

Each kernel runs through the function the switch installs (graftlm/train/speed.py: transformers' SDPA function on
one SDPA kernel, transformers' eager attention, graftlm's matmul attention; `auto`: what it becomes for that dtype and
length), causal, without a padding mask, as in training. Rounds are
interleaved, so a busy machine disturbs every kernel alike; the best round is shown, and its ratio to `auto`.
"""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def kernels(device: str) -> list[str]:
    return ["auto", "flash", "math", "eager", "matmul"] + (["efficient", "cudnn"] if device == "cuda" else [])


def attention_function(kernel: str, dtype, seq_len: int, device: str):
    import torch
    from transformers import AttentionInterface
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from graftlm.train.speed import _attention_implementation, auto_attention

    if kernel == "auto":  # what train.attention: auto becomes for this device, dtype and length
        precision = "bf16" if dtype == torch.bfloat16 else "fp32"
        kernel = auto_attention(SimpleNamespace(precision=precision, seq_len=seq_len), torch.device(device))
    if kernel == "eager":
        return eager_attention_forward
    return AttentionInterface()["sdpa" if kernel == "sdpa" else _attention_implementation(kernel)]


def time_kernel(kernel: str, dtype, seq_len: int, batch: int, device: str) -> float:
    import torch

    module = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, training=True, is_causal=True)
    q = torch.randn(batch, HEADS, seq_len, HEAD_DIM, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(batch, KV_HEADS, seq_len, HEAD_DIM, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(batch, KV_HEADS, seq_len, HEAD_DIM, dtype=dtype, device=device, requires_grad=True)
    forward = attention_function(kernel, dtype, seq_len, device)
    mask = None
    if forward.__name__ == "eager_attention_forward":  # it needs the causal mask spelled out, as transformers builds it
        mask = torch.full((seq_len, seq_len), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]
    grad = torch.randn(batch, seq_len, HEADS, HEAD_DIM, dtype=dtype, device=device)
    forward(module, q, k, v, mask, scaling=HEAD_DIM ** -0.5)[0].backward(grad)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    forward(module, q, k, v, mask, scaling=HEAD_DIM ** -0.5)[0].backward(grad)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--seq-lens", default="512,2048")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch

    print(f"{args.device}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}; batch {args.batch}, {HEADS}/{KV_HEADS} heads of {HEAD_DIM}, causal, fwd+bwd")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for seq_len in map(int, args.seq_lens.split(",")):
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                for kernel in kernels(args.device):
                    try:
                        seconds = time_kernel(kernel, dtype, seq_len, args.batch, args.device)
                    except RuntimeError as e:  # a kernel that cannot run this dtype or shape
                        best[kernel] = float("nan")
                        print(f"  {kernel}: {str(e).splitlines()[0][:100]}")
                        continue
                    best[kernel] = min(best.get(kernel, float("inf")), seconds)
            flops = 3 * 4 * args.batch * HEADS * seq_len * seq_len * HEAD_DIM / 2  # causal: half the square
            shown = "  ".join(f"{k} {s * 1e3:7.1f} ms ({flops / s / 1e9:5.0f} GFLOP/s, {best['auto'] / s:4.2f}x)"
                              for k, s in best.items())
            print(f"{dtype_name:9} seq {seq_len:5}: {shown}", flush=True)


if __name__ == "__main__":
    main()
