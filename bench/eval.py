"""Evaluation speed: one pass of each bundled eval set with graftlm's batched evaluator, in float32 and bfloat16,
against a plain transformers loop (one document per forward pass) on the same text, in one run.

    .venv/bin/python bench/eval.py [--max-documents 40] [--max-items 100] [--threads 1] [--model smollm2-135m]
        [--attention flash,auto]

Prints seconds per pass (what the training loop pays every `eval.every` steps; wall and CPU seconds, the latter
steadier on a shared machine) and the numbers themselves, for each `train.attention` kernel asked for: the model is
prepared as a training run of the demo (bf16, seq 512) prepares it with that kernel, since evaluations during
training run on the training's model (`auto`: what it resolves to there; `flash`: the kernel `auto` was before).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT = {"sib200-vi": "data/eval/sib200/vie_Latn/test.tsv", "sib200-en": "data/eval/sib200/eng_Latn/test.tsv"}
CHOICE = {"xcopa-vi": "data/eval/xcopa/vi/test.vi.jsonl", "xcopa-vi-en": "data/eval/xcopa/vi-en/test.vi.jsonl"}


def plain_loop_seconds(model, text_set, start_id: int) -> tuple[float, float]:
    """The baseline: each document alone through `model(input_ids)`, log-softmax summed; (wall, CPU) seconds."""
    import torch

    started, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for doc in text_set.documents:
            ids = torch.tensor([[start_id, *doc]])
            torch.log_softmax(model(ids).logits[0, :-1], dim=-1).gather(-1, ids[0, 1:, None]).sum()
    return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-documents", type=int, default=None, help="documents per text set (default: all)")
    parser.add_argument("--max-items", type=int, default=None, help="items per choice set (default: all)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--attention", default="flash,auto", help="train.attention kernels, comma-separated")
    args = parser.parse_args()
    os.chdir(REPO)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from graftlm.evaluate.bpb import fertility, load_text_set
    from graftlm.evaluate.config import ChoiceSetConfig, EvalConfig
    from graftlm.evaluate.scoring import start_token_id
    from graftlm.evaluate.suite import Evaluator
    from graftlm.models import load_model, load_tokenizer
    from graftlm.train.config import TrainConfig
    from graftlm.train.speed import prepare_for_speed

    tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    config = EvalConfig(text=TEXT, choice=CHOICE, max_documents=args.max_documents, max_items=args.max_items,
                        batch_size=args.batch_size)
    print(f"model {args.model}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"load average {os.getloadavg()[0]:.1f}, batch size {args.batch_size}")
    one_set = {name: config.model_copy(update={"text": {name: path}, "choice": {}}) for name, path in TEXT.items()}
    one_set |= {name: config.model_copy(update={"text": {}, "choice": {name: ChoiceSetConfig(path=path)}})
                for name, path in CHOICE.items()}
    timings: dict[tuple[str, str], float] = {}
    for attention, dtype in [(a, d) for a in args.attention.split(",") for d in args.dtypes.split(",")]:
        train = TrainConfig(precision="bf16", seq_len=512, attention=attention, compile=False)
        prepare_for_speed(model, train, torch.device("cpu"))
        label = f"{dtype} {attention}" + (f" ({model.config._attn_implementation})" if attention == "auto" else "")
        for name, set_config in one_set.items():
            evaluator = Evaluator.from_config(set_config.model_copy(update={"dtype": dtype}), tokenizer)
            started, cpu = time.perf_counter(), time.process_time()
            results = evaluator(model)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            if name in TEXT:
                r = results["text"][name]
                per_unit, unit = fertility(r)
                shown = f"bpb {r['bpb']:.4f}  tokens/{unit} {per_unit:.3f}  documents {r['documents']}"
            else:
                r = results["choice"][name]
                shown = (f"accuracy {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]  "
                         f"accuracy/byte {r['accuracy_norm']:.3f}  n {r['n']}")
            print(f"{name:12} {label:30} {seconds:7.1f} s ({cpu:6.1f} CPU s)   {shown}", flush=True)
            timings[name, dtype] = seconds  # the last kernel's (the default's, by default)
    model.set_attn_implementation("sdpa")  # the plain loop: the model as transformers loads it
    for name, path in TEXT.items():
        text_set = load_text_set(path, tokenizer, max_documents=args.max_documents)
        seconds, cpu = plain_loop_seconds(model, text_set, start_token_id(tokenizer))
        ratio = seconds / timings[name, "float32"] if (name, "float32") in timings else float("nan")
        print(f"{name:12} plain loop (float32, a document per forward pass) {seconds:7.1f} s ({cpu:6.1f} CPU s)   "
              f"graftlm float32 is {ratio:.2f}x faster", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
