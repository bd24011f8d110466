"""Training throughput and peak memory: graftlm's loop against the Hugging Face Trainer, same model, data and batch.

    .venv/bin/python bench/train_speed.py [--steps 4] [--batch-tokens 8192] [--micro-batch 2]

Full continued pre-training of SmolLM2-135M at seq 512 under bf16 on the CPU. Each contender runs in its own
process (so peak RSS is its own); tokens/s is measured over the steps after the first (warm-up). Prints both, the
ratio, and the ceiling of this machine (graftlm/train/flops.py's FLOPs per token at the measured bf16 matmul rate).
Targets: graftlm >= 1.5x the Trainer; graftlm peak RSS < 6 GiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEQ_LEN = 512


def prepare(workdir: Path) -> Path:
    """Export the base and pack the demo's Vietnamese text once; both contenders read the same sequences."""
    from graftlm.pipeline import run_stages
    from graftlm.recipe import load_recipe
    from graftlm.runs import RunDir

    recipe = load_recipe(REPO / "recipes/demo-vi.yaml", ["name=bench", "curate=null", "vocab=null"])
    run = RunDir.for_recipe(recipe, workdir)
    run_stages(recipe, run, ("base", "pack"))
    return run.root


def sequences(run_root: Path, count: int, seq_len: int = SEQ_LEN):
    import numpy as np

    from graftlm.data.mix import MixtureSampler
    from graftlm.data.pack import PackedSource

    sampler = MixtureSampler({"vi": PackedSource.open(run_root / "packed/vi")}, {"vi": 1.0}, seq_len, seed=0)
    return np.stack([sampler.next_sequence()[1] for _ in range(count)])


def worker_graftlm(run_root: Path, steps: int, batch_tokens: int, micro: int, loss: str = "chunked") -> list[float]:
    from graftlm.pipeline import run_stages
    from graftlm.recipe import load_recipe
    from graftlm.runs import RunDir

    recipe = load_recipe(REPO / "recipes/demo-vi.yaml", [
        "name=bench", "curate=null", "vocab=null", "mixture={vi: 1.0}", f"train.max_steps={steps}",
        f"train.batch_tokens={batch_tokens}", f"train.micro_batch_size={micro}", "train.checkpoint_every=0",
        f"train.seq_len={SEQ_LEN}", f"train.loss={loss}", "eval.text={}", "eval.choice={}"])
    run = RunDir(run_root)
    run_stages(recipe, run, ("train",), options={"train": {"fresh": True}})
    return [r["tokens_per_s"] for r in run.read_metrics() if "loss" in r]


def worker_graftlm_standard_loss(run_root: Path, steps: int, batch_tokens: int, micro: int) -> list[float]:
    return worker_graftlm(run_root, steps, batch_tokens, micro, loss="standard")


def worker_trainer(run_root: Path, steps: int, batch_tokens: int, micro: int, seq_len: int = SEQ_LEN,
                   device: str = "cpu") -> list[float]:
    """The Hugging Face Trainer on the same sequences and batch (also bench/scale.py's contender, on a GPU too)."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    per_step = batch_tokens // seq_len
    data = sequences(run_root, per_step * steps, seq_len)
    dataset = [{"input_ids": torch.from_numpy(row[:-1]), "labels": torch.from_numpy(row[:-1])} for row in data]
    model = AutoModelForCausalLM.from_pretrained(run_root / "base", dtype=torch.float32)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            times.append(time.perf_counter())

        def on_step_end(self, *args, **kwargs):
            times[-1] = batch_tokens / (time.perf_counter() - times[-1])

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, bf16=True, use_cpu=device == "cpu", per_device_train_batch_size=micro,
                                 gradient_accumulation_steps=per_step // micro, max_steps=steps, learning_rate=3e-4,
                                 lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.1, max_grad_norm=1.0,
                                 optim="adamw_torch_fused", logging_steps=1, save_strategy="no", report_to=[],
                                 dataloader_num_workers=0, seed=0, disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=dataset, callbacks=[StepTimer()]).train()
    return times


def run_worker(name: str, run_root: Path, args) -> tuple[float, float]:
    """(tokens/s after warm-up, peak RSS GiB) of one contender in a fresh process."""
    code = (f"import sys, json; sys.path.insert(0, {str(REPO / 'bench')!r}); import train_speed as b; "
            f"from pathlib import Path; r = b.worker_{name}(Path({str(run_root)!r}), {args.steps}, "
            f"{args.batch_tokens}, {args.micro_batch}); import resource; "
            f"print('RESULT', json.dumps([r, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    rates, peak_kib = json.loads(out.split("RESULT", 1)[1])
    rates = rates[1:]  # the first step warms up
    return sum(rates) / len(rates), peak_kib / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=2)
    args = parser.parse_args()
    from transformers import AutoConfig

    from graftlm.train.flops import flops_per_token, measure_cpu_matmul_flops

    with tempfile.TemporaryDirectory() as tmp:
        run_root = prepare(Path(tmp))
        ours, ours_rss = run_worker("graftlm", run_root, args)
        standard, standard_rss = run_worker("graftlm_standard_loss", run_root, args)
        theirs, theirs_rss = run_worker("trainer", run_root, args)
        per_token = flops_per_token(AutoConfig.from_pretrained(run_root / "base"), SEQ_LEN)
    peak = measure_cpu_matmul_flops()  # now, under the same load as the runs (not the cached figure)
    ceiling = peak / per_token
    print(f"SmolLM2-135M, seq {SEQ_LEN}, {args.batch_tokens} tokens/step (micro-batch {args.micro_batch}), bf16, "
          f"{args.steps} steps (first excluded)")
    print(f"graftlm loop       : {ours:7.1f} tok/s   peak RSS {ours_rss:5.2f} GiB (target < 6)")
    print(f"  same, standard CE: {standard:7.1f} tok/s   peak RSS {standard_rss:5.2f} GiB (all logits at once)")
    print(f"HF Trainer         : {theirs:7.1f} tok/s   peak RSS {theirs_rss:5.2f} GiB")
    print(f"ratio              : {ours / theirs:7.2f}x (target >= 1.5x)")
    print(f"ceiling here       : {ceiling:7.1f} tok/s ({per_token / 1e9:.2f} GFLOP/token, graftlm/train/flops.py, at "
          f"{peak / 1e12:.3f} TFLOP/s bf16 matmul); graftlm's MFU {ours / ceiling:.0%}")


if __name__ == "__main__":
    main()
