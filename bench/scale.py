"""Scaling out: memory per process and tokens/s with more processes, MFU beside the Hugging Face Trainer, and the
largest model that fits one device. One script, one time limit.

    .venv/bin/python bench/scale.py [--time-limit 1800] [--sections processes,mfu,fit] [--json out.json]

Sections (default: `processes` everywhere, `mfu` and `fit` too when a CUDA device is present):

processes  `graft train` of SmolLM2-135M (the bundled base, full training, bf16 autocast) in 1 process and in 2
           processes under `accelerate launch --multi_gpu --num_processes 2` (gloo on a CPU), the same global
           batch, with DDP and with FSDP (`train.distributed.strategy: fsdp`); each process's peak memory (RSS on a
           CPU with glibc's mmap threshold fixed (see run_graft), torch's allocation on a GPU) and the run's
           tokens/s over the steps after the first. The memory per process must fall with FSDP at 2 processes. Two
           peaks: while training (each rank's peak RSS at the last step, from metrics.jsonl), which includes
           loading the whole model in every process before it is sharded; and the process's whole life, which on
           the main process adds the whole model gathered for the final checkpoint and the export. On a CPU each
           process gets --cpu-threads threads (default 1: a process per core, as a
           process per GPU; OpenMP threads sharing busy cores slow down out of proportion).
mfu        per model of the SmolLM2 family (the bundled 135M, and a 1.7B config in random init), `graft train` and
           the Hugging Face Trainer on the same packed sequences and batch: tokens/s, MFU against the device's bf16
           peak (graftlm/train/flops.py: 6·N + 12·L·H·Q·T FLOPs per token), peak memory.
fit        the largest of a ladder of Llama-shaped configs (SmolLM2's vocabulary) whose training step fits one
           device, with and without activation checkpointing: fp32 weights and AdamW state, bf16 autocast, one
           sequence per micro-batch, as graftlm's full training holds them, in a plain loop (saving a 8B model
           for `graft train` would take minutes). FSDP divides the weights, gradients and AdamW state over the
           devices (16/N bytes per parameter); with one device it helps only with train.distributed.cpu_offload,
           which this plain loop does not measure.

Each contender runs in its own process (its memory is its own) with the time that is left; what the time limit
cuts is printed as not measured. --device cpu with --models tiny --ladder tiny runs the GPU sections' code on a
CPU in seconds (a smoke test, not a figure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
RECIPE = REPO / "recipes/demo-vi.yaml"
GIB = 2**30

PROCESS_ROWS = [("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2)]
"""(strategy, processes): `graft train --set train.distributed.strategy=<strategy>` in that many processes."""

SMOLLM2 = {"vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
           "bos_token_id": 1, "eos_token_id": 2}
MODELS = {
    # the published configs of the SmolLM2 family (HuggingFaceTB/SmolLM2-*/config.json); `tiny` for smoke tests
    "smollm2-135m": dict(SMOLLM2, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000),
    "smollm2-360m": dict(SMOLLM2, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, rope_theta=100000),
    "smollm2-1.7b": dict(SMOLLM2, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, rope_theta=130000),
    # Llama-3.2-3B's and Llama-3.1-8B's shapes and a 14B-class one, with SmolLM2's vocabulary
    "llama-3b": dict(SMOLLM2, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                     num_attention_heads=24, num_key_value_heads=8, rope_theta=500000),
    "llama-8b": dict(SMOLLM2, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000),
    "llama-14b": dict(SMOLLM2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=8, rope_theta=500000),
    "tiny": dict(SMOLLM2, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000),
}
BUNDLED = {"smollm2-135m"}
"""Models trained from the bundled weights (`base_model: smollm2-135m`); the others start from random init."""


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


class OutOfTime(Exception):
    pass


def llama_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(**MODELS[name])


# ---- running graftlm and the Trainer in their own processes ---------------------------------------------------


def worker_main(record_prefix: str, argv: list[str]) -> None:
    """`scale.py worker PREFIX -- GRAFT ARGS`: the `graft` command in this process (one rank of a launch), then
    this process's peak memory in PREFIX-<rank>.json."""
    import torch

    from graftlm.cli import main
    from graftlm.train.flops import peak_memory_bytes

    sys.argv = ["graft", *argv]
    try:
        main()
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    finally:
        rank = int(os.environ.get("RANK", 0))
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        Path(f"{record_prefix}-{rank}.json").write_text(json.dumps({
            "rank": rank, "device": device, "peak_memory_bytes": peak_memory_bytes(device)}))


def run_graft(graft_args: list[str], work: Path, label: str, budget: Budget, processes: int = 1,
              threads: int | None = None) -> list[dict]:
    """`graft ...` in `processes` processes (accelerate's launcher for more than one); each rank's memory record."""
    if budget.left() < 30:
        raise OutOfTime(label)
    prefix = work / f"memory-{label}"
    command = [sys.executable, str(Path(__file__).resolve()), "worker", str(prefix), "--", *graft_args]
    if processes > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   *command[1:]]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    # glibc raises its mmap threshold as large blocks are freed, then serves tensors from a heap that it keeps: the
    # RSS peak would count memory freed long before. A fixed threshold gives every tensor over 128 KiB its own
    # mapping, returned when it is freed, so the peak RSS is the peak of live memory (for DDP and FSDP alike).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    try:
        result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=budget.left())
    except subprocess.TimeoutExpired:
        raise OutOfTime(label) from None
    if result.returncode != 0:
        raise RuntimeError(f"{label}: exit {result.returncode}\n{result.stderr[-4000:]}")
    return [json.loads(p.read_text()) for p in sorted(work.glob(f"memory-{label}-*.json"))]


def trainer_in_process(run_root: Path, steps: int, batch_tokens: int, micro: int, seq_len: int,
                       device: str, budget: Budget) -> tuple[list[float], int]:
    """The Hugging Face Trainer on the run's packed sequences (bench/train_speed.py's contender), in a fresh process:
    its tokens/s per step and its peak memory."""
    if budget.left() < 30:
        raise OutOfTime("trainer")
    code = (f"import sys, json; sys.path.insert(0, {str(REPO / 'bench')!r}); import train_speed as b; "
            "from pathlib import Path; from graftlm.train.flops import peak_memory_bytes; "
            f"r = b.worker_trainer(Path({str(run_root)!r}), {steps}, {batch_tokens}, {micro}, seq_len={seq_len}, "
            f"device={device!r}); print('RESULT', json.dumps([r, peak_memory_bytes({device!r})]))")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    try:
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env,
                             timeout=budget.left()).stdout
    except subprocess.TimeoutExpired:
        raise OutOfTime("trainer") from None
    rates, memory = json.loads(out.split("RESULT", 1)[1])
    return rates, memory


def recipe_args(base_model: str, steps: int, batch_tokens: int, micro: int, seq_len: int,
                extra: list[str] = ()) -> list[str]:
    settings = ["name=scale", "curate=null", "vocab=null", "mixture={vi: 1.0}", f"base_model={base_model}",
                f"train.max_steps={steps}", f"train.batch_tokens={batch_tokens}", f"train.micro_batch_size={micro}",
                f"train.seq_len={seq_len}", "train.checkpoint_every=0", "eval.text={}", "eval.choice={}",
                "eval.generate={}", "eval.lens={}", *extra]  # training alone: no evaluation of any kind
    return [str(RECIPE), *[arg for setting in settings for arg in ("--set", setting)]]


def prepare(base_model: str, runs: Path, budget: Budget, **batch) -> Path:
    """`graft prepare`: the base exported and the demo's Vietnamese text packed, once per model."""
    run_graft(["prepare", *recipe_args(base_model, **batch), "--runs-dir", str(runs)], runs, "prepare", budget)
    return runs / "scale"


def train_rates(run_root: Path) -> list[float]:
    """tokens/s of every step after the first (which warms up)."""
    from graftlm.runs import RunDir

    rates = [r["tokens_per_s"] for r in RunDir(run_root).read_metrics() if "loss" in r and "tokens_per_s" in r]
    return rates[1:]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def random_base(name: str, folder: Path, device: str) -> Path:
    """A Hugging Face folder with `name`'s config in random init and the bundled SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    from graftlm.models import load_tokenizer, save_model

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it is fast; saved from the CPU
        model = LlamaForCausalLM(llama_config(name))
    save_model(model.cpu(), load_tokenizer("smollm2-135m"), folder)
    return folder


# ---- the sections ---------------------------------------------------------------------------------------------


def section_processes(args, work: Path, budget: Budget) -> list[dict]:
    from graftlm.runs import RunDir

    batch = dict(steps=args.steps, batch_tokens=args.cpu_batch_tokens, micro=args.cpu_micro_batch,
                 seq_len=args.cpu_seq_len)
    runs = work / "processes"
    run_root = prepare("smollm2-135m", runs, budget, **batch)
    rows = []
    for strategy, processes in PROCESS_ROWS:
        label = f"{strategy}-{processes}"
        extra = [f"train.distributed.strategy={strategy}"]
        row = {"section": "processes", "model": "smollm2-135m", "strategy": strategy, "processes": processes,
               "threads_per_process": args.cpu_threads}
        try:
            ranks = run_graft(["train", *recipe_args("smollm2-135m", **batch, extra=extra), "--runs-dir", str(runs),
                               "--fresh"], work, label, budget, processes, threads=args.cpu_threads)
        except OutOfTime:
            rows.append({**row, "measured": False})
            continue
        rates = train_rates(run_root)
        steps = [r for r in RunDir(run_root).read_metrics() if "loss" in r]  # memory_gib: each rank's peak so far
        rows.append({**row, "measured": True, "tokens_per_s": mean(rates),
                     "training_memory_gib_per_process": steps[-1].get("memory_gib"),
                     "peak_memory_gib_per_process": [round(r["peak_memory_bytes"] / GIB, 3) for r in ranks]})
    return rows


def section_mfu(args, work: Path, budget: Budget) -> list[dict]:
    from graftlm.train.flops import flops_per_token, peak_flops

    rows = []
    for name in args.models:
        micro = args.micro_batch.get(name, 1)
        batch = dict(steps=args.steps, batch_tokens=args.batch_tokens, micro=micro, seq_len=args.seq_len)
        row = {"section": "mfu", "model": name, "device": args.device, "seq_len": args.seq_len,
               "batch_tokens": args.batch_tokens, "micro_batch": micro}
        try:
            runs = work / f"mfu-{name}"
            base = name if name in BUNDLED else str(random_base(name, work / f"models/{name}", args.device))
            run_root = prepare(base, runs, budget, **batch)
            ranks = run_graft(["train", *recipe_args(base, **batch), "--runs-dir", str(runs), "--fresh"], work,
                              f"mfu-{name}", budget)
            ours = mean(train_rates(run_root))
            trainer_rates, trainer_memory = trainer_in_process(run_root, args.steps, args.batch_tokens, micro,
                                                               args.seq_len, args.device, budget)
        except OutOfTime:
            rows.append({**row, "measured": False})
            continue
        theirs = mean(trainer_rates[1:])
        per_token = flops_per_token(llama_config(name), args.seq_len)
        peak = peak_flops(args.device)
        rows.append({**row, "measured": True, "flops_per_token": per_token, "peak_tflops": peak and peak / 1e12,
                     "graftlm_tokens_per_s": ours, "graftlm_mfu": peak and ours * per_token / peak,
                     "graftlm_peak_memory_gib": ranks[0]["peak_memory_bytes"] / GIB,
                     "trainer_tokens_per_s": theirs, "trainer_mfu": peak and theirs * per_token / peak,
                     "trainer_peak_memory_gib": trainer_memory / GIB, "ratio": ours / theirs})
    return rows


FIT_STEP = """
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from graftlm.train.flops import peak_memory_bytes
config, seq_len = LlamaConfig(**json.loads(sys.argv[1])), int(sys.argv[2])
checkpointing, device = sys.argv[3] == "1", sys.argv[4]
try:
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device != "cpu")
    tokens = torch.randint(0, config.vocab_size, (1, seq_len), device=device)
    for _ in range(2):  # the optimizer's state is allocated by the first step
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print("RESULT", json.dumps({"fits": True, "peak_memory_bytes": peak_memory_bytes(device)}))
except torch.OutOfMemoryError:
    print("RESULT", json.dumps({"fits": False, "peak_memory_bytes": None}))
"""


def section_fit(args, work: Path, budget: Budget) -> list[dict]:
    rows = []
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for checkpointing in (False, True):
        for name in args.ladder:  # smallest first; the first that does not fit ends the ladder
            row = {"section": "fit", "model": name, "activation_checkpointing": checkpointing, "strategy": "single",
                   "seq_len": args.seq_len, "parameters": _parameters(name)}
            if budget.left() < 30:
                rows.append({**row, "measured": False})
                continue
            try:
                out = subprocess.run([sys.executable, "-c", FIT_STEP, json.dumps(MODELS[name]), str(args.seq_len),
                                      "1" if checkpointing else "0", args.device], capture_output=True, text=True,
                                     env=env, timeout=budget.left(), check=True).stdout
            except subprocess.TimeoutExpired:
                rows.append({**row, "measured": False})
                break
            result = json.loads(out.split("RESULT", 1)[1])
            rows.append({**row, "measured": True, **result})
            if not result["fits"]:
                break
    return rows


def _parameters(name: str) -> int:
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        model = LlamaForCausalLM(llama_config(name))
    return sum(p.numel() for p in model.parameters())


# ---- printing -------------------------------------------------------------------------------------------------


def print_rows(rows: list[dict]) -> None:
    for row in rows:
        if not row.get("measured"):
            print(f"{row['section']:9s} {row['model']:13s} {_what(row)}: not measured (time limit)")
        elif row["section"] == "processes":
            memory = ", ".join(f"{m:.2f}" for m in row["peak_memory_gib_per_process"])
            training = ", ".join(f"{m:.2f}" for m in row.get("training_memory_gib_per_process") or [])
            print(f"processes {row['model']:13s} {_what(row)} ({row['threads_per_process']} thread(s) each): "
                  f"{row['tokens_per_s']:8.1f} tok/s   peak memory per process {training} GiB while training, "
                  f"{memory} GiB with the export")
        elif row["section"] == "mfu":
            mfu = (lambda v: f"{v:6.1%}" if v is not None else "   n/a")
            print(f"mfu       {row['model']:13s} seq {row['seq_len']}, {row['batch_tokens']} tok/step, micro "
                  f"{row['micro_batch']}, {row['flops_per_token'] / 1e9:.2f} GFLOP/token, peak "
                  f"{row['peak_tflops'] or float('nan'):.1f} TFLOP/s")
            print(f"            graftlm    {row['graftlm_tokens_per_s']:10.1f} tok/s  MFU {mfu(row['graftlm_mfu'])}  "
                  f"peak {row['graftlm_peak_memory_gib']:.2f} GiB")
            print(f"            HF Trainer {row['trainer_tokens_per_s']:10.1f} tok/s  MFU {mfu(row['trainer_mfu'])}  "
                  f"peak {row['trainer_peak_memory_gib']:.2f} GiB   ratio {row['ratio']:.2f}x")
        else:
            memory = (f"peak {row['peak_memory_bytes'] / GIB:.1f} GiB" if row["fits"] else "out of memory")
            print(f"fit       {row['model']:13s} {row['parameters'] / 1e9:5.2f}B params, activation checkpointing "
                  f"{'on ' if row['activation_checkpointing'] else 'off'}: {memory}")
    for checkpointing in (False, True):
        fitted = [r for r in rows if r["section"] == "fit" and r.get("fits")
                  and r["activation_checkpointing"] == checkpointing]
        if fitted:
            print(f"largest that fits one device, checkpointing {'on' if checkpointing else 'off'}: "
                  f"{fitted[-1]['model']} ({fitted[-1]['parameters'] / 1e9:.2f}B)")


def _what(row: dict) -> str:
    if "strategy" in row and "processes" in row:
        return f"{row['strategy']} x{row['processes']}"
    if "activation_checkpointing" in row:
        return f"checkpointing {'on' if row['activation_checkpointing'] else 'off'}"
    return row.get("device", "")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        separator = sys.argv.index("--")
        return worker_main(sys.argv[2], sys.argv[separator + 1:])

    import torch

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-limit", type=float, default=1800, help="seconds for the whole script")
    parser.add_argument("--sections", default="processes,mfu,fit" if cuda else "processes")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--cpu-seq-len", type=int, default=256)
    parser.add_argument("--cpu-batch-tokens", type=int, default=4096)
    parser.add_argument("--cpu-micro-batch", type=int, default=2)
    parser.add_argument("--cpu-threads", type=int, default=1, help="threads per process of the processes section")
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="of the mfu and fit sections")
    parser.add_argument("--models", default="smollm2-135m,smollm2-1.7b", help="of the mfu section")
    parser.add_argument("--ladder", default="smollm2-1.7b,llama-3b,llama-8b,llama-14b", help="of the fit section")
    parser.add_argument("--seq-len", type=int, default=2048, help="of the mfu and fit sections")
    parser.add_argument("--batch-tokens", type=int, default=65536, help="of the mfu section")
    parser.add_argument("--micro-batch", default="smollm2-135m=16,smollm2-1.7b=8,tiny=2",
                        help="sequences per micro-batch, per model of the mfu section")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.models = args.models.split(",")
    args.ladder = args.ladder.split(",")
    args.micro_batch = {k: int(v) for k, v in (item.split("=") for item in args.micro_batch.split(","))}
    unknown = [m for m in args.models + args.ladder if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")

    budget = Budget(args.time_limit)
    sections = {"processes": section_processes, "mfu": section_mfu, "fit": section_fit}
    rows: list[dict] = []
    print(f"bench/scale.py on {torch.cuda.get_device_name() if cuda else 'CPU'} ({os.cpu_count()} cores), "
          f"time limit {args.time_limit:.0f}s, {args.steps} steps per run (first not timed)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sections.split(","):
            try:
                new = sections[name](args, Path(tmp), budget)
            except OutOfTime:
                new = [{"section": name, "model": "-", "measured": False}]
            print_rows(new)
            rows += new
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
