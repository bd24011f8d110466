"""`graft train`: continue pre-training the run's start model on the recipe's mixture of packed sources.

One optimizer step = `batch_tokens` tokens drawn by the mixture sampler, split across processes (DDP under
`accelerate launch`) and micro-batches (gradient accumulation), under bf16 autocast with fp32 master weights.
Every step appends a line to metrics.jsonl; checkpoints every `checkpoint_every` steps make the run resumable
exactly: killed at any moment and restarted, it logs the same losses as an uninterrupted run.

What learns is `train.method` (graftlm/train/methods.py: full, lora, layra, freeze); training runs in phases
(`train.stages`, graftlm/train/phases.py), each with its own trainable parameters, fresh optimizer and schedule.
Optional: distillation toward the start model on replay sequences (distill.py; `loss` stays the cross-entropy,
`distill` is the added term) and a moving average of the weights (ema.py). The exported model, runs/<name>/model/,
is a plain Hugging Face folder with any adapter merged (the adapter alone goes to runs/<name>/adapter/).
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
from graftlm.models import save_model, tokenizer_files
from graftlm.progress import log, steps_progress
from graftlm.recipe import Recipe
from graftlm.runs import RunDir, atomic_dir, fingerprint, hash_files, read_json
from graftlm.train.checkpoint import (check_resumable, complete_checkpoints, load_training_state,
                                      restore_rng_states, save_checkpoint)
from graftlm.train.distill import Distiller, replay_sources
from graftlm.train.ema import EMA
from graftlm.train.loss import CausalLMLoss
from graftlm.train.methods import ADAPTER_DIR, Method, trainable_count
from graftlm.train.phases import Phase, phase_at, plan_phases
from graftlm.train.speed import prepare_for_speed, to_device, weight_casts_per_step

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
    phase: int = 0
    """The phase whose optimizer state the checkpoint holds."""
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
    checkpoints = [] if fresh else complete_checkpoints(run)
    if not checkpoints and accelerator.is_main_process:
        _clear_outputs(run)  # starting over: nothing that an earlier, unfinished run logged may stay
    accelerator.wait_for_everyone()
    resume_from = checkpoints[-1][1] if checkpoints else None
    state = TrainerState()
    torch.manual_seed(cfg.seed)  # before adapters are initialised; a resumed run restores its own random state
    method = Method.load(cfg, run.start_model, resume_from, recipe.trust_remote_code)
    model = method.model.to(accelerator.device)  # before the EMA copies its weights
    tokenizer = load_run_tokenizer(run)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if cfg.method != "full":
            model.enable_input_require_grads()  # recomputed blocks need an input that requires grad
    model = prepare_for_speed(model, cfg, accelerator.device)
    model.train()
    sampler = MixtureSampler(sources, recipe.mixture_weights(), cfg.seq_len, cfg.seed, recipe.mixture.repeat)
    phases = plan_phases(cfg)
    ema = EMA(method.all_phase_parameters([p.train for p in phases]), cfg.ema.decay) if cfg.ema else None
    distiller, replay = None, None
    if cfg.distill is not None:
        distiller = Distiller.load(run.start_model, cfg.distill, accelerator.device, recipe.trust_remote_code)
        replay = set(replay_sources(recipe))
        log(f"train: distilling toward {run.start_model} on {', '.join(sorted(replay)) or 'no source'}")
    saved_optimizer = None
    if resume_from is not None:
        saved, training_state = load_training_state(resume_from)
        check_resumable(saved["recipe"], recipe_dump, saved["data"], data_key, resume_from)
        restore_rng_states(training_state)
        saved_optimizer = training_state["optimizer"]
        state = TrainerState(**saved["state"])
        sampler.load_state(state.sampler)
        if ema is not None:
            ema.load(resume_from)
        if accelerator.is_main_process:
            _truncate_metrics(run, state.step)
        log(f"train: resuming from {resume_from.name} (step {state.step}, {state.tokens:,} tokens)")

    total_steps = cfg.total_steps
    if accelerator.is_main_process:
        log(f"train: method {cfg.method}, {total_steps} steps of {cfg.batch_tokens:,} tokens in {len(phases)} "
            f"phase(s), {world} process(es) on {accelerator.device}")
    phase: Phase | None = None
    trainable = {p.index: trainable_count(*method.parameters(p.train), method.rows) for p in phases}

    evaluator = build_evaluator(recipe, tokenizer) if accelerator.is_main_process else None
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
            save_checkpoint(run, state.step, method.export_model(), tokenizer, optimizer,
                            {"state": asdict(state), "recipe": recipe_dump, "data": data_key},
                            keep=cfg.keep_checkpoints, write_more=lambda folder: _save_more(folder, method, ema))

    with steps_progress(show=accelerator.is_main_process) as progress:
        task = progress.add_task("train", total=total_steps, completed=state.step, status="")
        if not evaluated_at:
            evaluate(progress)  # the base, before any update
        while state.step < total_steps:
            if phase is None or not phase.covers(state.step):
                phase = phase_at(phases, state.step)
                resumed = saved_optimizer if state.phase == phase.index else None
                optimizer, wrapped, params = _start_phase(phase, method, cfg, accelerator, distiller, resumed)
                saved_optimizer, state.phase = None, phase.index
                total = method.model_size()
                log(f"train: phase {phase.index + 1}/{len(phases)} ({phase.train}, {phase.steps} steps, peak lr "
                    f"{phase.lr:g}): {trainable[phase.index]:,} trainable parameters of {total:,} "
                    f"({trainable[phase.index] / total:.2%})")
            started = time.perf_counter()
            try:
                batch, names = sampler.next_batch(cfg.sequences_per_step)
            except MixtureExhausted as e:
                log(f"train: source '{e}' is exhausted and mixture.repeat is false: stopping at step {state.step}")
                break
            lr = phase.lr_at(state.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            flags = np.array([name in replay for name in names]) if replay is not None else None
            loss, distilled = _accumulate_gradients(wrapped, batch[rank::world],
                                                    flags[rank::world] if flags is not None else None, cfg,
                                                    accelerator)
            loss, distilled = accelerator.reduce(torch.stack([loss, distilled]), reduction="mean").tolist()
            if math.isfinite(loss):
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")).item()
                optimizer.step()
                if ema is not None:
                    ema.update()
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
            record = {"step": state.step, "tokens": state.tokens,
                      "loss": loss - distilled if math.isfinite(loss) else None,
                      "lr": lr, "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                      "tokens_per_s": round(cfg.batch_tokens / seconds, 1),
                      "tokens_by_source": sampler.tokens_by_source(cfg.seq_len), "epochs": sampler.epochs()}
            if distiller is not None:
                record["distill"] = distilled if math.isfinite(loss) else None
            if len(phases) > 1:
                record["phase"] = phase.index
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
        export_ema = ema is not None and cfg.ema.export
        if export_ema and evaluator is not None:
            with ema.applied():  # the exported model is evaluated last: the verdict is about it
                run.append_metrics({"step": state.step, "tokens": state.tokens, "model": "ema",
                                    "eval": evaluator(model, progress=progress)})

    accelerator.wait_for_everyone()  # no process looks at checkpoints/ while the main one writes there
    saved_steps = [step for step, _ in complete_checkpoints(run)]
    if not saved_steps or saved_steps[-1] != state.step:  # (a run resumed from its final checkpoint has it)
        checkpoint()
    if accelerator.is_main_process:
        marker = {"fingerprint": final_key, "step": state.step, "tokens": state.tokens,
                  "skipped_steps": state.skipped_steps, "elapsed_s": round(state.elapsed_s, 1),
                  "tokens_by_source": sampler.tokens_by_source(cfg.seq_len), "method": cfg.method,
                  "trainable_parameters": [{"train": p.train, "steps": p.steps, "parameters": trainable[p.index]}
                                           for p in phases], "ema": export_ema}
        with ema.applied() if export_ema else contextlib.nullcontext():
            if method.peft:
                with atomic_dir(run.adapter) as folder:
                    method.save_adapter(folder, run.start_model)
            save_model(method.export_model(), tokenizer, run.model,
                       extra_files={FINAL_MARKER: json.dumps(marker, indent=2)})
        log(f"train: {state.step} steps, {state.tokens:,} tokens in {state.elapsed_s:.0f}s -> {run.model}")
    accelerator.wait_for_everyone()
    return run.model


def _start_phase(phase: Phase, method: Method, cfg, accelerator, distiller: Distiller | None,
                 saved_optimizer: dict | None):
    """A phase's trainable parameters, its fresh optimizer (or the checkpoint's, when resuming inside it) and the
    loss wrapped for DDP (again per phase: DDP only synchronises what requires grad when it is built)."""
    groups = method.start_phase(phase.train)
    optimizer = torch.optim.AdamW(groups, lr=phase.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                  **_fused_if_available(accelerator.device))
    if saved_optimizer is not None:
        optimizer.load_state_dict(saved_optimizer)
    wrapped = accelerator.prepare_model(CausalLMLoss.from_config(method.model, cfg, accelerator.device, distiller))
    return optimizer, wrapped, [p for group in groups for p in group["params"]]


def _save_more(folder: Path, method: Method, ema: EMA | None) -> None:
    """What a checkpoint needs beyond the merged weights to resume exactly."""
    if method.peft:
        method.model.save_pretrained(folder / ADAPTER_DIR)
    if ema is not None:
        ema.save(folder)


def build_evaluator(recipe: Recipe, tokenizer):
    if not (recipe.eval.text or recipe.eval.choice):
        return None
    from graftlm.evaluate.suite import Evaluator

    return Evaluator.from_config(recipe.eval, tokenizer)


def _accumulate_gradients(wrapped, local_batch: np.ndarray, local_replay: np.ndarray | None, cfg,
                          accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over micro-batches; returns the mean loss over this process's sequences and the
    distillation term's share of it. `local_replay` marks the sequences to distill on (None: no distillation)."""
    tokens = to_device(local_batch, accelerator.device)
    micro_batches = tokens.split(cfg.micro_batch_size)
    replay = [None] * len(micro_batches) if local_replay is None else \
        torch.from_numpy(local_replay).to(accelerator.device).split(cfg.micro_batch_size)
    loss_module = accelerator.unwrap_model(wrapped)
    total = torch.zeros((), device=accelerator.device)
    distilled = torch.zeros((), device=accelerator.device)
    with weight_casts_per_step(cfg, accelerator.device):
        for i, (micro, flags) in enumerate(zip(micro_batches, replay)):
            weight = len(micro) / len(tokens)
            last = i == len(micro_batches) - 1
            extra = {} if flags is None else {"replay": flags}
            with contextlib.nullcontext() if last else accelerator.no_sync(wrapped), _autocast(cfg, accelerator):
                loss = wrapped(micro[:, :-1], micro[:, 1:], **extra)
            if torch.isfinite(loss):
                (loss * weight).backward()
            total += loss.detach().float() * weight
            if flags is not None and loss_module.distill_part is not None:
                distilled += loss_module.distill_part.float() * weight
    return total, distilled


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


def load_run_tokenizer(run: RunDir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(run.start_model))


def _final_model_matches(run: RunDir, key: str) -> bool:
    marker = run.model / FINAL_MARKER
    return marker.is_file() and read_json(marker).get("fingerprint") == key


def _clear_outputs(run: RunDir) -> None:
    for path in (run.checkpoints, run.model, run.adapter, run.merged):
        shutil.rmtree(path, ignore_errors=True)
    run.metrics.unlink(missing_ok=True)


def _truncate_metrics(run: RunDir, step: int) -> None:
    """Drop what an interrupted run logged after its last checkpoint (the resumed run logs those steps again), and
    the evaluations of exported models (EMA, merged), which are made again at the end."""
    run.write_metrics([r for r in run.read_metrics() if r.get("step", 0) <= step and "model" not in r])

