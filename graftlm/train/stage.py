"""The `train` stage: continue pre-training the run's start model on the recipe's mixture of packed sources.

Every step appends a line to metrics.jsonl; checkpoints every `checkpoint_every` steps make the run resumable
exactly: killed at any moment and restarted, it logs the same losses as an uninterrupted run. SIGTERM, SIGUSR1 or
SIGINT (a scheduler's preemption, Ctrl-C) finish the step, write a checkpoint and stop with exit code 128 + the
signal's number (143, 138, 130); a second signal stops at once (graftlm/signals.py, the Preemption callback).

What learns is `train.method` (graftlm/train/methods.py: full, lora, layra, freeze); training runs in phases
(`train.phases`, graftlm/train/phases.py), each with its own trainable parameters, fresh optimizer and schedule.
Optional: distillation toward the start model on replay sequences (distill.py; `loss` stays the cross-entropy,
`distill` is the added term) and a moving average of the weights (ema.py). The exported model, runs/<name>/model/,
is a plain Hugging Face folder with any adapter merged (the adapter alone goes to runs/<name>/adapter/).

Setup, in order: open the packed data; decide between resuming and starting over; build the model (sharded across
the processes with `train.distributed.strategy: fsdp`, train/sharding.py), the sampler, the phases, the moving
average and the teacher; restore a checkpoint's state; then the trainer runs with its callbacks, and the result is
exported.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graftlm.data.mix import MixtureSampler
from graftlm.data.pack import PackedSource
from graftlm.errors import GraftError
from graftlm.evaluate.lens import token_languages_for_run
from graftlm.evaluate.suite import Evaluator
from graftlm.models import load_tokenizer, tokenizer_files
from graftlm.precision import train_precision
from graftlm.progress import log
from graftlm.runs import RunDir, hash_files, read_json
from graftlm.signals import graceful
from graftlm.stage import Stage
from graftlm.train.callbacks import (Checkpointer, DivergenceGuard, Evaluation, Export, MetricsFile,
                                     MovingAverage, Preemption, ProgressBar, StepHook)
from graftlm.train.background import BackgroundEvaluations
from graftlm.train.checkpoint import check_resumable, latest_valid_checkpoint
from graftlm.train.distill import Distiller
from graftlm.train.ema import EMA
from graftlm.train.flops import flops_per_token, peak_flops
from graftlm.train.methods import Method
from graftlm.train.module import TrainModule
from graftlm.train.phases import plan_phases
from graftlm.train.sharding import Replicated, prepare_sharding
from graftlm.train.speed import prepare_for_speed
from graftlm.train.trackers import Trackers
from graftlm.train.trainer import Trainer, TrainerState


class Train(Stage):
    name = "train"
    needs = ("pack",)
    distributed = True
    outputs = ("checkpoints", "model", "adapter")

    def marker(self, unit):
        return self.run_dir.train_marker

    def fingerprint(self, unit):
        dump = self.recipe.model_dump(mode="json")
        return [dump["train"], dump["mixture"], open_packed(self.recipe, self.run_dir)[1],
                str(self.run_dir.start_model)]

    def run(self, unit, key):
        train(self.recipe, self.run_dir, key, fresh=self.fresh, on_step_end=self.options.get("on_step_end"))


@dataclass
class Resumed:
    """What a checkpoint restores."""

    folder: Path
    state: TrainerState
    optimizer: Any
    """The optimizer state, as the strategy's `load_optimizer` takes it (fsdp: the checkpoint's folder)."""


def train(recipe, run: RunDir, key: str, fresh: bool = False, on_step_end=None) -> None:
    """Train to the end of the recipe's budget, resuming from the latest checkpoint unless `fresh`, and export
    runs/<name>/model/ with its marker (holding `key`)."""
    accelerator = _accelerator(recipe.train)
    cfg = recipe.train.model_copy(update={"precision": _precision(recipe.train.precision, accelerator)})
    sources, data_key = open_packed(recipe, run)
    checkpoint = _checkpoint_to_resume(run, fresh, accelerator)
    method = _load_method(recipe, cfg, run, checkpoint, accelerator)
    sharding = prepare_sharding(method, cfg, accelerator)  # fsdp shards the model here, before the EMA copies it
    tokenizer = load_tokenizer(str(run.start_model), recipe.trust_remote_code)
    sampler = MixtureSampler(sources, recipe.mixture_weights(), cfg.seq_len, cfg.seed, recipe.mixture.repeat)
    phases = plan_phases(cfg)
    ema = EMA(method.all_phase_parameters([p.train for p in phases]), cfg.ema.decay) if cfg.ema else None
    distiller, replay = _teacher(recipe, run, accelerator)
    recipe_dump = recipe.model_dump(mode="json")
    resumed = _restore(checkpoint, recipe_dump, data_key, sampler, ema, run, accelerator, sharding) \
        if checkpoint else None
    module = TrainModule(method, cfg, phases, accelerator, distiller, replay,
                         resumed.state.phase if resumed else None, resumed.optimizer if resumed else None, sharding)
    log(f"train: method {cfg.method}, {cfg.total_steps} steps of {cfg.batch_tokens:,} tokens in {len(phases)} "
        f"phase(s), {accelerator.num_processes} process(es) ({cfg.distributed.strategy}) on {accelerator.device}, "
        f"{cfg.precision}")
    export_ema = ema if ema is not None and cfg.ema.export else None
    evaluator = background = None
    if accelerator.is_main_process and recipe.eval.background and recipe.eval.names_anything:
        background = BackgroundEvaluations(run, functools.partial(_evaluator, recipe, run, tokenizer), cfg,
                                           recipe.trust_remote_code, accelerator.device)  # the worker builds it
    elif accelerator.is_main_process:
        evaluator = _evaluator(recipe, run, tokenizer)
    accelerator.wait_for_everyone()  # metrics.jsonl is truncated to the checkpoint by now
    evaluated_at = [r["step"] for r in run.read_metrics() if "eval" in r]
    checkpointer = Checkpointer(run, cfg.checkpoint_every, cfg.keep_checkpoints, tokenizer, recipe_dump, data_key, ema)
    callbacks = [*([MovingAverage(ema)] if ema is not None else []), MetricsFile(run),
                 Trackers(recipe.report.trackers, run.trackers, recipe.name, recipe_dump), ProgressBar(),
                 DivergenceGuard(cfg.max_bad_steps, run),
                 Evaluation(evaluator, [recipe.eval.every, recipe.eval.harness.every], evaluated_at, export_ema,
                            background),
                 checkpointer, Preemption(checkpointer), Export(run, key, tokenizer, export_ema),
                 *([StepHook(on_step_end)] if on_step_end is not None else [])]
    try:
        with graceful():  # a signal from here on stops after a step, with a checkpoint
            Trainer(module, sampler, resumed.state if resumed else TrainerState(), cfg.total_steps, callbacks,
                    accelerator).fit()
    finally:
        sharding.close()


def _evaluator(recipe, run: RunDir, tokenizer) -> Evaluator | None:
    """The recipe's evaluations; the logit lens tells the languages of tokens apart by their frequencies in the
    packed data of each language's sources."""
    lens = recipe.eval.lens.text
    token_languages = token_languages_for_run(recipe, run, len(tokenizer), tokenizer.all_special_ids) if lens else None
    return Evaluator.for_recipe(recipe.eval, tokenizer, work_dir=run.inside("eval"), target=recipe.target_language,
                                token_languages=token_languages)


def _accelerator(cfg):
    from accelerate import Accelerator

    # autocast is applied explicitly (TrainModule.autocast); cpu=True lets several CPU processes form a gloo group
    accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.sequences_per_step % accelerator.num_processes:
        raise GraftError(f"train.batch_tokens: {cfg.sequences_per_step} sequences per step do not split evenly "
                         f"over {accelerator.num_processes} processes")
    return accelerator


def _precision(setting: str, accelerator) -> str:
    """`train.precision` as this run applies it; every process takes the main process's (auto is measured)."""
    from accelerate.utils import broadcast_object_list

    precision = [train_precision(setting, accelerator.device)]
    return broadcast_object_list(precision)[0] if accelerator.num_processes > 1 else precision[0]


def _load_method(recipe, cfg, run: RunDir, checkpoint: Path | None, accelerator) -> Method:
    """The start model (or the checkpoint's weights) prepared for `train.method`, on the device, in train mode."""
    torch.manual_seed(cfg.seed)  # before adapters are initialised; a resumed run restores its own random state
    method = Method.load(cfg, run.start_model, checkpoint, recipe.trust_remote_code)
    model = method.model.to(accelerator.device)  # before the EMA copies its weights
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if cfg.method != "full":
            model.enable_input_require_grads()  # recomputed blocks need an input that requires grad
    prepare_for_speed(model, cfg, accelerator.device, _estimated_seconds(model, cfg, accelerator))
    model.train()
    return method


def _estimated_seconds(model, cfg, accelerator) -> float | None:
    """The training's seconds at the device's peak (train/flops.py), for `compile: auto`; None for several
    processes or an unknown peak."""
    peak = peak_flops(accelerator.device, bf16=cfg.precision == "bf16")
    if accelerator.num_processes > 1 or not peak:
        return None
    return flops_per_token(model.config, cfg.seq_len, model=model) * cfg.total_steps * cfg.batch_tokens / peak


def _teacher(recipe, run: RunDir, accelerator) -> tuple[Distiller | None, set[str] | None]:
    """train.distill: the frozen start model, and the sources whose sequences are distilled on."""
    config = recipe.train.distill
    if config is None:
        return None, None
    distiller = Distiller.load(run.start_model, config, accelerator.device, recipe.trust_remote_code)
    replay = set(config.sources if config.sources is not None else recipe.replay_sources())
    log(f"train: distilling toward {run.start_model} on {', '.join(sorted(replay)) or 'no source'}")
    return distiller, replay


def open_packed(recipe, run: RunDir) -> tuple[dict[str, PackedSource], dict]:
    """The packed sources of the mixture, checked against the run's tokenizer; and their fingerprints."""
    expected = hash_files(tokenizer_files(run.start_model)) if run.start_model.is_dir() else None
    sources = {}
    for name, weight in recipe.mixture_weights().items():
        if weight <= 0:
            continue
        folder = run.packed / name
        if not (folder / "manifest.json").is_file():
            raise GraftError(f"{folder}: not packed (the pack stage did not run)")
        packed = PackedSource.open(folder)
        if packed.manifest["tokenizer"] != expected:
            raise GraftError(f"{folder}: packed with another tokenizer than {run.start_model}")
        sources[name] = packed
    return sources, {name: s.manifest["fingerprint"] for name, s in sources.items()}


def _checkpoint_to_resume(run: RunDir, fresh: bool, accelerator) -> Path | None:
    """The latest checkpoint that verifies (damaged ones are moved aside); None when starting over (then nothing
    an earlier, unfinished run logged or wrote may stay)."""
    folder = None if fresh or not accelerator.is_main_process else latest_valid_checkpoint(run)
    if accelerator.num_processes > 1:  # the main process verified the checkpoints: every process follows it
        from accelerate.utils import broadcast_object_list

        folder = broadcast_object_list([folder])[0]
    if folder is None and accelerator.is_main_process:
        for path in (run.checkpoints, run.model, run.adapter, run.merged):
            shutil.rmtree(path, ignore_errors=True)
        run.metrics.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return folder


def _restore(folder: Path, recipe_dump: dict, data_key: dict, sampler: MixtureSampler, ema: EMA | None,
             run: RunDir, accelerator, sharding: Replicated) -> Resumed:
    saved = read_json(folder / "trainer_state.json")
    check_resumable(saved["recipe"], recipe_dump, saved["data"], data_key, folder)
    optimizer = sharding.restore(folder, ema)  # random states, the EMA (fsdp: the weights too, resharded)
    state = TrainerState(**saved["state"])
    sampler.load_state(state.sampler)
    if accelerator.is_main_process:
        # what an interrupted run logged after its last checkpoint is logged again; the evaluations of exported
        # models (EMA, merged) are made again at the end
        run.write_metrics([r for r in run.read_metrics() if r.get("step", 0) <= state.step and "model" not in r])
    log(f"train: resuming from {folder.name} (step {state.step}, {state.tokens:,} tokens)")
    return Resumed(folder, state, optimizer)
