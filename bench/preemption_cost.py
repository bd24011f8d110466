"""What the processes' agreement on a stop costs per training step (the Preemption callback's all-reduce of one
number), against the step itself, on the tests' tiny model with two gloo processes, in one run.

    .venv/bin/python bench/preemption_cost.py [--steps 40] [--calls 2000]

Each process trains a DDP-wrapped random 4-block Llama (1.6 M parameters) on 8 sequences of 32 tokens a step
(4 per process, the tests' tiny run); blocks of steps without and with the agreement alternate, so that both see the
same machine. Prints the median step time of each, the agreement's own median latency, and the ratio.
Target: the agreement adds under 1% to a step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from types import SimpleNamespace


def worker(rank: int, world: int, steps: int, calls: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from graftlm.train.callbacks import _agreed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = torch.nn.parallel.DistributedDataParallel(LlamaForCausalLM(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    group = SimpleNamespace(num_processes=world, device=torch.device("cpu"))
    tokens = torch.randint(0, 49152, (4, 33), generator=torch.Generator().manual_seed(rank))

    def step(agree: bool) -> float:
        started = time.perf_counter()
        loss = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(loss.detach())  # the step's loss is reduced for the log, as TrainModule does
        if agree:
            _agreed(0, group)
        return time.perf_counter() - started

    for _ in range(5):
        step(False)
    plain, agreeing = [], []
    for block in range(steps // 5):
        (agreeing if block % 2 else plain).extend(step(bool(block % 2)) for _ in range(5))
    dist.barrier()
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        _agreed(0, group)
        latencies.append(time.perf_counter() - started)
    if rank == 0:
        out.put((statistics.median(plain), statistics.median(agreeing), statistics.median(latencies)))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()

    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    out = context.SimpleQueue()
    mp.start_processes(worker, args=(2, args.steps, args.calls, port, out), nprocs=2, start_method="spawn")
    plain, agreeing, latency = out.get()
    print(f"step without agreement: {plain * 1e3:.2f} ms (median of {args.steps // 2})")
    print(f"step with agreement:    {agreeing * 1e3:.2f} ms")
    print(f"agreement alone:        {latency * 1e6:.0f} us (median of {args.calls} all-reduces, gloo, 2 processes)")
    print(f"agreement / step:       {latency / plain:.2%}")


if __name__ == "__main__":
    main()
