"""`graft train`: continue pre-training the run's start model on the recipe's mixture of packed sources.

One optimizer step = `batch_tokens` tokens drawn by the mixture sampler, split across processes (DDP under
`accelerate launch`) and micro-batches (gradient accumulation), under bf16 autocast with fp32 master weights.
Every step appends a line to metrics.jsonl; checkpoints every `checkpoint_every` steps make the run resumable
exactly: killed at any moment and restarted, it logs the same losses as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from graftlm.data.mix import MixtureExhausted, MixtureSampler
from graftlm.data.pack import PackedSource
from graftlm.errors import GraftError
from graftlm.models import load_model, save_model, tokenizer_files
from graftlm.progress import log, steps_progress
from graftlm.recipe import Recipe
from graftlm.runs import RunDir, fingerprint, hash_files, read_json, write_text_atomic
from graftlm.train.checkpoint import (check_resumable, complete_checkpoints, load_training_state,
                                      save_checkpoint)
from graftlm.train.loss import CausalLMLoss
from graftlm.train.schedule import lr_multiplier

FINAL_MARKER = "graft-train.json"


class TrainingDiverged(GraftError):
    exit_code = 3


@dataclass
class TrainerState:
    step: int = 0
    tokens: int = 0
    bad_streak: int = 0
    skipped_steps: int = 0
    elapsed_s: float = 0.0
    sampler: dict = field(default_factory=dict)


def train(recipe: Recipe, run: RunDir, fresh: bool = False,
          on_step_end: Callable[[int], None] | None = None) -> Path:
    """Train to the end of the recipe's budget, resuming from the latest checkpoint unless `fresh`.
    Returns the folder of the final model. `on_step_end(step)` is a hook for tests (e.g. to kill mid-run)."""
    from accelerate import Accelerator

    cfg = recipe.train
    # autocast is applied explicitly (see `_autocast`); cpu=True lets several CPU processes form a gloo group
    accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.sequences_per_step % world:
        raise GraftError(f"train.batch_tokens: {cfg.sequences_per_step} sequences per step do not split evenly "
                         f"over {world} processes")

    sources, data_key = _open_packed(recipe, run)
    recipe_dump = recipe.model_dump(mode="json")
    final_key = fingerprint(recipe_dump["train"], recipe_dump["mixture"], data_key, str(run.start_model))
    if not fresh and _final_model_matches(run, final_key):
        log(f"train: {run.model} is up to date")
        return run.model
    if fresh and accelerator.is_main_process:
        _clear_outputs(run)
    accelerator.wait_for_everyone()

    checkpoints = complete_checkpoints(run)
    resume_from = checkpoints[-1][1] if checkpoints else None
    state = TrainerState()
    model = load_model(str(resume_from or run.start_model), trust_remote_code=recipe.trust_remote_code)
    tokenizer = _load_run_tokenizer(run)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    sampler = MixtureSampler(sources, recipe.mixture_weights(), cfg.seq_len, cfg.seed, recipe.mixture.repeat)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                  **_fused_if_available(accelerator.device))
    if resume_from is not None:
        saved, training_state = load_training_state(resume_from)
        check_resumable(saved["recipe"], recipe_dump, saved["data"], data_key, resume_from)
        optimizer.load_state_dict(training_state["optimizer"])
        torch.set_rng_state(training_state["torch_rng"])
        state = TrainerState(**saved["state"])
        sampler.load_state(state.sampler)
        if accelerator.is_main_process:
            _truncate_metrics(run, state.step)
        log(f"train: resuming from {resume_from.name} (step {state.step}, {state.tokens:,} tokens)")
    else:
        torch.manual_seed(cfg.seed)

    wrapped = accelerator.prepare_model(CausalLMLoss(model, chunked=cfg.loss == "chunked"))
    total_steps = cfg.total_steps
    if accelerator.is_main_process:
        log(f"train: {sum(p.numel() for p in params):,} trainable parameters, {total_steps} steps of "
            f"{cfg.batch_tokens:,} tokens, {world} process(es) on {accelerator.device}")

    evaluator = _build_evaluator(recipe, tokenizer) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()  # metrics.jsonl is truncated to the checkpoint by now
    evaluated_at = [r["step"] for r in run.read_metrics() if "eval" in r]

    def evaluate(progress) -> None:
        """Score the held-out sets (main process only) into metrics.jsonl: the stability-gap curve."""
        if evaluator is not None:
            results = evaluator(model, progress=progress)
            run.append_metrics({"step": state.step, "tokens": state.tokens, "eval": results})
        evaluated_at.append(state.step)
        accelerator.wait_for_everyone()

    def checkpoint() -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state.sampler = sampler.state()
            save_checkpoint(run, state.step, model, tokenizer, optimizer,
                            {"state": asdict(state), "recipe": recipe_dump, "data": data_key},
                            keep=cfg.keep_checkpoints)

    with steps_progress(show=accelerator.is_main_process) as progress:
        task = progress.add_task("train", total=total_steps, completed=state.step, status="")
        if not evaluated_at:
            evaluate(progress)  # the base, before any update
        while state.step < total_steps:
            started = time.perf_counter()
            try:
                batch, names = sampler.next_batch(cfg.sequences_per_step)
            except MixtureExhausted as e:
                log(f"train: source '{e}' is exhausted and mixture.repeat is false: stopping at step {state.step}")
                break
            lr = cfg.lr * lr_multiplier(state.step, total_steps, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = _accumulate_gradients(wrapped, batch[rank::world], cfg, accelerator)
            loss = accelerator.reduce(loss, reduction="mean").item()
            if math.isfinite(loss):
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")).item()
                optimizer.step()
                state.bad_streak = 0
            else:
                grad_norm = float("nan")
                state.bad_streak += 1
                state.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += cfg.batch_tokens
            seconds = time.perf_counter() - started
            state.elapsed_s += seconds
            record = {"step": state.step, "tokens": state.tokens, "loss": loss if math.isfinite(loss) else None,
                      "lr": lr, "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                      "tokens_per_s": round(cfg.batch_tokens / seconds, 1),
                      "tokens_by_source": sampler.tokens_by_source(cfg.seq_len), "epochs": sampler.epochs()}
            if not math.isfinite(loss):
                record["skipped"] = True
            if accelerator.is_main_process:
                run.append_metrics(record)
            progress.update(task, completed=state.step,
                            status=f"loss {loss:.3f}  lr {lr:.2e}  {record['tokens_per_s']:.0f} tok/s")
            if state.bad_streak >= cfg.max_bad_steps:
                last = complete_checkpoints(run)
                raise TrainingDiverged(
                    f"train: {state.bad_streak} non-finite losses in a row at step {state.step}; stopped. "
                    f"Last good checkpoint: {last[-1][1] if last else 'none'}. Try a lower train.lr")
            if recipe.eval.every and state.step % recipe.eval.every == 0:
                evaluate(progress)
            checkpoint_due = cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0
            if checkpoint_due and state.step < total_steps and state.bad_streak == 0:  # only good states are kept
                checkpoint()
            if on_step_end is not None:
                on_step_end(state.step)
        if not evaluated_at or evaluated_at[-1] != state.step:
            evaluate(progress)  # the end of training

    checkpoint()
    if accelerator.is_main_process:
        save_model(model, tokenizer, run.model, extra_files={
            FINAL_MARKER: json.dumps({"fingerprint": final_key, "step": state.step, "tokens": state.tokens,
                                 "skipped_steps": state.skipped_steps, "elapsed_s": round(state.elapsed_s, 1),
                                 "tokens_by_source": sampler.tokens_by_source(cfg.seq_len)}, indent=2)})
        log(f"train: {state.step} steps, {state.tokens:,} tokens in {state.elapsed_s:.0f}s -> {run.model}")
    accelerator.wait_for_everyone()
    return run.model


def _build_evaluator(recipe: Recipe, tokenizer):
    if not (recipe.eval.text or recipe.eval.choice):
        return None
    from graftlm.evaluate.suite import Evaluator

    return Evaluator.from_config(recipe.eval, tokenizer)


def _accumulate_gradients(wrapped, local_batch: np.ndarray, cfg, accelerator) -> torch.Tensor:
    """Forward and backward over micro-batches; returns the mean loss over this process's sequences."""
    tokens = torch.from_numpy(local_batch).to(accelerator.device)
    micro_batches = tokens.split(cfg.micro_batch_size)
    total = torch.zeros((), device=accelerator.device)
    for i, micro in enumerate(micro_batches):
        weight = len(micro) / len(tokens)
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(wrapped), _autocast(cfg, accelerator):
            loss = wrapped(micro[:, :-1], micro[:, 1:])
        if torch.isfinite(loss):
            (loss * weight).backward()
        total += loss.detach().float() * weight
    return total


def _autocast(cfg, accelerator):
    return torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def _fused_if_available(device: torch.device) -> dict:
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def _open_packed(recipe: Recipe, run: RunDir) -> tuple[dict[str, PackedSource], dict]:
    """The packed sources of the mixture, checked against the run's tokenizer; and their fingerprints."""
    expected = hash_files(tokenizer_files(run.start_model)) if run.start_model.is_dir() else None
    sources = {}
    for name, weight in recipe.mixture_weights().items():
        if weight <= 0:
            continue
        folder = run.packed / name
        if not (folder / "manifest.json").is_file():
            raise GraftError(f"{folder}: not packed yet; run `graft prepare` first")
        packed = PackedSource.open(folder)
        if packed.manifest["tokenizer"] != expected:
            raise GraftError(f"{folder}: packed with another tokenizer than {run.start_model}; run `graft prepare`")
        sources[name] = packed
    return sources, {name: s.manifest["fingerprint"] for name, s in sources.items()}


def _load_run_tokenizer(run: RunDir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(run.start_model))


def _final_model_matches(run: RunDir, key: str) -> bool:
    marker = run.model / FINAL_MARKER
    return marker.is_file() and read_json(marker).get("fingerprint") == key


def _clear_outputs(run: RunDir) -> None:
    for path in (run.checkpoints, run.model):
        shutil.rmtree(path, ignore_errors=True)
    run.metrics.unlink(missing_ok=True)


def _truncate_metrics(run: RunDir, step: int) -> None:
    """Drop what an interrupted run logged after its last checkpoint: the resumed run logs those steps again."""
    kept = [r for r in run.read_metrics() if r.get("step", 0) <= step]
    write_text_atomic(run.metrics, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))

