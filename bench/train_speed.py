"""Training throughput and peak memory: graftlm's loop against the Hugging Face Trainer, same model, data and batch.

    .venv/bin/python bench/train_speed.py [--steps 4] [--batch-tokens 8192] [--micro-batch 2] [--seq-len 512]
        [--rounds 1] [--device cpu|cuda] [--threads N] [--set train.KEY=VALUE ...]
        [--variant NAME:train.KEY=VALUE,... ...]

Full continued pre-training of SmolLM2-135M in the precision `train.precision` becomes here (auto: bf16 autocast
where the device computes bf16 faster than fp32, else fp32; graftlm/precision.py), the Trainer in the same one. Each contender runs in its own process (so peak
RSS is its own), through the real code path: graftlm's `train()` on the bundled demo recipe (plus `--set`
overrides), the Trainer with fused AdamW on the same packed sequences. A `--variant` is graftlm with more
overrides (e.g. `--variant compile:train.compile=true`), to measure one speed-up's own gain in the same run.
tokens/s is measured over the steps after the first (the first step, compilation included, is shown apart).
`--rounds N` repeats every contender N times, interleaved, so that a busy machine disturbs them alike; the ratio is
taken round by round. On a machine shared with other jobs, `--threads 1` keeps torch's OpenMP threads from
waiting on each other at every barrier while the scheduler runs someone else (with 2 threads on 2 busy cores a
step can take 4x longer than with 1).

The ceiling is what this machine could reach if every FLOP ran at its matmul rate in that precision: (6·N + attention) FLOP per
token, N the parameters that take part in matrix products (the input embedding only when it is the tied output
layer), attention 6·layers·seq·(heads·head_dim) (QKᵀ and AV, forward and backward, causal: half the square). The
rate is measured in each contender's process, before and after its steps, on the model's own MLP shape and on a
square product (the better of the two). The row "products only" runs nothing but the step's linear-layer products
(forward, gradient of the input, gradient of the weight, on random tensors of the step's shapes) and adds the
attention's FLOPs at that rate: the share of the ceiling it reaches is the most a loop built on these product kernels
can reach, whatever it does around them (`--no-products` skips it).
Targets (CPU): graftlm >= 1.5x the Trainer, >= 70 % of the ceiling, peak RSS < 6 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def prepare(workdir: Path) -> Path:
    """Export the base and pack the demo's Vietnamese text once; every contender reads the same sequences."""
    from graftlm.pipeline import run_stages
    from graftlm.recipe import load_recipe
    from graftlm.runs import RunDir

    recipe = load_recipe(REPO / "recipes/demo-vi.yaml", ["name=bench", "curate=null", "vocab=null"])
    run = RunDir.for_recipe(recipe, workdir)
    run_stages(recipe, run, ("base", "pack"))
    return run.root


def sequences(run_root: Path, count: int, seq_len: int):
    import numpy as np

    from graftlm.data.mix import MixtureSampler
    from graftlm.data.pack import PackedSource

    sampler = MixtureSampler({"vi": PackedSource.open(run_root / "packed/vi")}, {"vi": 1.0}, seq_len, seed=0)
    return np.stack([sampler.next_sequence()[1] for _ in range(count)])


class StepClock:
    """Wall and CPU seconds of each step, from the end of one step to the end of the next (the first step is timed
    from the start)."""

    def __init__(self):
        self.last = (time.perf_counter(), time.process_time())
        self.steps: list[tuple[float, float]] = []

    def tick(self, *_, **__) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        now = (time.perf_counter(), time.process_time())
        self.steps.append((now[0] - self.last[0], now[1] - self.last[1]))
        self.last = now


def worker_graftlm(run_root: Path, args: dict, overrides: list[str], clock: StepClock) -> None:
    from graftlm.pipeline import run_stages
    from graftlm.recipe import load_recipe
    from graftlm.runs import RunDir

    recipe = load_recipe(REPO / "recipes/demo-vi.yaml", [
        "name=bench", "curate=null", "vocab=null", "mixture={vi: 1.0}", f"train.max_steps={args['steps']}",
        f"train.batch_tokens={args['batch_tokens']}", f"train.micro_batch_size={args['micro_batch']}",
        "train.checkpoint_every=0", f"train.seq_len={args['seq_len']}", "eval.text={}", "eval.choice={}",
        "eval.generate.prompts={}", "eval.lens.text={}", f"train.precision={'bf16' if args['bf16'] else 'fp32'}",
        *overrides])  # the precision the Trainer gets too (auto is resolved once, in the parent)
    run = RunDir(run_root)
    first = [True]

    def on_step_end(step: int) -> None:
        if first[0]:  # the first step counts from its own start (loading the model is not a step)
            first[0] = False
            wall = args["batch_tokens"] / [r for r in run.read_metrics() if "loss" in r][0]["tokens_per_s"]
            clock.steps.append((wall, float("nan")))
            clock.last = (time.perf_counter(), time.process_time())
        else:
            clock.tick()

    run_stages(recipe, run, ("train",), options={"train": {"fresh": True, "on_step_end": on_step_end}}, needs=False)


def worker_trainer(run_root: Path, args: dict, overrides: list[str], clock: StepClock) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    seq_len, steps, batch_tokens, micro = args["seq_len"], args["steps"], args["batch_tokens"], args["micro_batch"]
    per_step = batch_tokens // seq_len
    data = sequences(run_root, per_step * steps, seq_len)
    dataset = [{"input_ids": torch.from_numpy(row[:-1]), "labels": torch.from_numpy(row[:-1])} for row in data]
    model = AutoModelForCausalLM.from_pretrained(run_root / "base", dtype=torch.float32)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if not clock.steps:
                clock.last = (time.perf_counter(), time.process_time())

        def on_step_end(self, *a, **k):
            clock.tick()

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, bf16=args["bf16"], use_cpu=args["device"] != "cuda",
                                  per_device_train_batch_size=micro, gradient_accumulation_steps=per_step // micro,
                                  max_steps=steps, learning_rate=3e-4, lr_scheduler_type="cosine", warmup_steps=0,
                                  weight_decay=0.1, max_grad_norm=1.0, optim="adamw_torch_fused", logging_steps=1,
                                  save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0,
                                  disable_tqdm=True)
        Trainer(model=model, args=targs, train_dataset=dataset, callbacks=[StepTimer()]).train()


def worker_products(run_root: Path, args: dict, overrides: list[str], clock: StepClock) -> None:
    """Only the matrix products of the linear layers (the output layer included) that a training step runs, forward
    and backward, on random tensors of the step's shapes in its precision, with the attention's FLOPs added at the
    matmul rate measured before: the speed of a step that did nothing but these products, the most any loop using
    these product kernels can reach."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(run_root / "base")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    dtype = torch.bfloat16 if args["bf16"] else torch.float32
    tokens = args["micro_batch"] * args["seq_len"]
    layers = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    tensors = {shape: (torch.randn(tokens, shape[0], dtype=dtype, device=args["device"]),
                       torch.randn(shape[1], shape[0], dtype=dtype, device=args["device"]),
                       torch.randn(tokens, shape[1], dtype=dtype, device=args["device"])) for shape in set(layers)}
    _, attention, _, _ = flops_per_token(run_root / "base", args["seq_len"])
    attention_s = attention * args["batch_tokens"] / args["matmul_rate"]  # per step
    for _ in range(args["steps"]):
        for _ in range(args["batch_tokens"] // tokens):
            for shape in layers:
                x, w, g = tensors[shape]
                x @ w.T, g @ w, g.T @ x  # forward, gradient of the input, gradient of the weight
        clock.tick()
        wall, cpu = clock.steps[-1]
        clock.steps[-1] = (wall + attention_s, cpu * (1 + attention_s / wall))


def matmul_rate(device: str, bf16: bool, tokens: int, hidden: int, intermediate: int) -> tuple[float, float]:
    """Matrix-product FLOP per wall second and per CPU second on `device` in bf16 (or fp32): the better of the
    model's MLP product and a square one."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32

    def rate(m: int, k: int, n: int, repeats: int) -> tuple[float, float]:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        a @ b
        best_wall = best_cpu = float("inf")
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            started, cpu = time.perf_counter(), time.process_time()
            for _ in range(repeats):
                a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            best_wall = min(best_wall, (time.perf_counter() - started) / repeats)
            best_cpu = min(best_cpu, (time.process_time() - cpu) / repeats)
        return 2 * m * k * n / best_wall, 2 * m * k * n / best_cpu

    square = 8192 if device == "cuda" else 2048
    repeats = 50 if device == "cuda" else 4
    mlp, squared = rate(tokens, hidden, intermediate, repeats), rate(square, square, square, repeats)
    return max(mlp[0], squared[0]), max(mlp[1], squared[1])


def worker(name: str, run_root: str, args: dict, overrides: list[str], shapes: tuple[int, int, int]) -> None:
    """One contender in this process; prints RESULT and a JSON line."""
    import resource

    import torch

    rates = [matmul_rate(args["device"], args["bf16"], *shapes)]
    args = dict(args, matmul_rate=rates[0][0])
    clock = StepClock()
    globals()[f"worker_{name}"](Path(run_root), args, overrides, clock)
    rates.append(matmul_rate(args["device"], args["bf16"], *shapes))
    device_peak = torch.cuda.max_memory_allocated() / 2**30 if args["device"] == "cuda" else None
    print("RESULT", json.dumps({"steps": clock.steps, "matmul": rates, "device_peak": device_peak,
                                "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def run_worker(name: str, run_root: Path, args: argparse.Namespace, overrides: list[str],
               shapes: tuple[int, int, int]) -> dict:
    """Run a contender in a fresh process: tokens per wall and per CPU second after the first step, the first
    step's seconds, peak RSS, the matmul rates."""
    settings = {k: getattr(args, k) for k in ("steps", "batch_tokens", "micro_batch", "seq_len", "device", "bf16")}
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import train_speed as b; "
            f"b.worker({name!r}, {str(run_root)!r}, {settings!r}, {overrides!r}, {shapes!r})")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{name} {' '.join(overrides)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.split("RESULT", 1)[1])
    (first, _), *steps = result["steps"]
    return {"tok_s": args.batch_tokens * len(steps) / sum(w for w, _ in steps),
            "tok_cpu_s": args.batch_tokens * len(steps) / sum(c for _, c in steps),
            "first_s": first, "rss": result["rss"], "device_peak": result["device_peak"],
            "matmul": statistics.mean(w for w, _ in result["matmul"]),
            "matmul_cpu": statistics.mean(c for _, c in result["matmul"])}


def flops_per_token(base: Path, seq_len: int) -> tuple[float, float, tuple[int, int, int], str]:
    """(6·N, attention FLOP per token, the MLP product's shape for a micro-batch, the model's name) from its config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    if not config.tie_word_embeddings:
        params -= model.get_input_embeddings().weight.numel()  # a lookup, not a product
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 6 * config.num_hidden_layers * seq_len * config.num_attention_heads * head_dim
    return 6 * params, attention, (seq_len, config.hidden_size, config.intermediate_size), \
        f"{config.model_type} N={params / 1e6:.1f}M"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1, help="repeat every contender, interleaved")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="train.KEY=VALUE",
                        help="a recipe override for graftlm and its variants")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:train.KEY=VALUE,...",
                        help="graftlm with more overrides, measured beside it")
    parser.add_argument("--no-trainer", action="store_true", help="only graftlm and its variants")
    parser.add_argument("--no-products", action="store_true",
                        help="skip the products-only row (the step's linear-layer products alone: the most a loop "
                             "on these kernels can reach)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for every contender (default: torch's own, one per core)")
    args = parser.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device here")
    from graftlm.precision import train_precision

    asked = [o.split("=", 1)[1] for o in args.overrides if o.startswith("train.precision=")]
    args.precision = train_precision(asked[-1] if asked else "auto", args.device)
    args.bf16 = args.precision == "bf16"
    contenders = [("graftlm", "graftlm", args.overrides)]
    if not args.no_trainer:
        contenders.append(("HF Trainer", "trainer", []))
    if not args.no_products:
        contenders.append(("products only", "products", []))
    for variant in args.variant:
        label, _, sets = variant.partition(":")
        contenders.append((f"  {label}", "graftlm", args.overrides + [s for s in sets.split(",") if s]))

    results: dict[str, list[dict]] = {label: [] for label, _, _ in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        run_root = prepare(Path(tmp))
        six_n, attention, shapes, model_name = flops_per_token(run_root / "base", args.seq_len)
        shapes = (args.micro_batch * args.seq_len, shapes[1], shapes[2])
        for round_ in range(args.rounds):
            for label, kind, overrides in contenders:
                result = run_worker(kind, run_root, args, overrides, shapes)
                results[label].append(result)
                print(f"round {round_ + 1}: {label.strip():24} {result['tok_s']:8.1f} tok/s {result['tok_cpu_s']:8.1f} "
                      f"tok/CPU-s", flush=True)

    per_token = six_n + attention
    print(f"\n{model_name}, seq {args.seq_len}, {args.batch_tokens} tokens/step (micro-batch {args.micro_batch}), "
          f"{args.precision} on {args.device}, {args.steps} steps per run (first excluded), {args.rounds} round(s), "
          f"{os.cpu_count()} CPUs ({args.threads or 'default'} threads), load average {os.getloadavg()[0]:.1f}; "
          f"graftlm: {' '.join(args.overrides) or 'defaults'}")
    print(f"{'contender':24} {'tok/s':>7} {'(each round)':>20} {'first step':>10} {'peak RSS':>9} {'ceiling':>7} "
          f"{'share':>5} {'tok/CPU-s':>9} {'share':>5}")
    for label, rows in results.items():
        each = " ".join(f"{r['tok_s']:.1f}" for r in rows)
        memory = f"{max(r['rss'] for r in rows):5.2f} GiB"
        if rows[0]["device_peak"] is not None:
            memory += f" (GPU {max(r['device_peak'] for r in rows):.2f} GiB)"
        print(f"{label:24} {med(rows, 'tok_s'):7.1f} {each:>20} {med(rows, 'first_s'):8.1f} s {memory} "
              f"{statistics.median(r['matmul'] / per_token for r in rows):7.1f} "
              f"{statistics.median(r['tok_s'] / (r['matmul'] / per_token) for r in rows):5.0%} "
              f"{med(rows, 'tok_cpu_s'):9.1f} "
              f"{statistics.median(r['tok_cpu_s'] / (r['matmul_cpu'] / per_token) for r in rows):5.0%}")
    ours = results["graftlm"]
    for key, unit in (("tok_s", "wall"), ("tok_cpu_s", "CPU")):
        if "HF Trainer" in results:
            ratios = [a[key] / b[key] for a, b in zip(ours, results["HF Trainer"])]
            print(f"ratio graftlm / Trainer ({unit} time): {statistics.median(ratios):.2f}x (each round: "
                  f"{' '.join(f'{r:.2f}' for r in ratios)}; target >= 1.5x)")
        for label, rows in results.items():
            if label.startswith("  "):
                gains = [v[key] / g[key] for v, g in zip(rows, ours)]
                print(f"  {label.strip()} / graftlm ({unit} time): {statistics.median(gains):.3f}x (each round: "
                      f"{' '.join(f'{g:.3f}' for g in gains)})")
    rates = [r["matmul"] for rows in results.values() for r in rows]
    print(f"ceiling: (6N {six_n / 1e6:.0f} + attention {attention / 1e6:.0f}) MFLOP/token at the {args.precision} matmul rate "
          f"measured in each run ({min(rates) / 1e9:.0f}-{max(rates) / 1e9:.0f} GFLOP/s); graftlm reaches "
          f"{statistics.median(r['tok_s'] / (r['matmul'] / per_token) for r in ours):.0%} of it (target >= 70%); "
          f"per CPU second (time the process ran, as the matmul rate): "
          f"{statistics.median(r['tok_cpu_s'] / (r['matmul_cpu'] / per_token) for r in ours):.0%}")


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


if __name__ == "__main__":
    main()
