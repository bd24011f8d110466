"""Checkpoints that make a resumed run repeat an uninterrupted one exactly.

    runs/<name>/checkpoints/step-000100/   a Hugging Face folder (config, model.safetensors, tokenizer) that
                                           `graft eval --model` loads, plus
        training_state.pt                  optimizer state and RNG states (loaded with weights_only=True)
        adapter/                           lora/layra: the adapter's exact weights (the folder's own weights are
                                           merged, for evaluation)
        ema.safetensors                    with train.ema: the moving average
        trainer_state.json                 step, tokens, the phase, the sampler's position, counters, the recipe;
                                           written last

Each checkpoint is written into a temporary folder and renamed when complete, so a run killed at any moment leaves
only complete checkpoints behind.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from graftlm.errors import GraftError
from graftlm.models import save_tokenizer
from graftlm.runs import RunDir, atomic_dir, flatten, read_json, write_json_atomic

STEP_DIR = re.compile(r"^step-(\d+)$")

RESUME_SAFE_KEYS = ("eval", "train.checkpoint_every", "train.keep_checkpoints", "train.max_bad_steps",
                    "train.micro_batch_size", "train.ema.export", "merge", "report")
"""Recipe keys that may change between an interrupted run and its resumption without making it wrong."""


def checkpoint_path(run: RunDir, step: int) -> Path:
    return run.checkpoints / f"step-{step:06d}"


def complete_checkpoints(run: RunDir) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first; leftovers of a killed write are removed."""
    if not run.checkpoints.is_dir():
        return []
    found = []
    for folder in run.checkpoints.iterdir():
        match = STEP_DIR.match(folder.name)
        if match and (folder / "trainer_state.json").is_file():
            found.append((int(match.group(1)), folder))
        elif ".tmp-" in folder.name or ".old-" in folder.name:
            shutil.rmtree(folder, ignore_errors=True)
    return sorted(found)


def save_checkpoint(run: RunDir, step: int, model, tokenizer, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], keep: int, write_more: Callable[[Path], None] | None = None) -> Path:
    """`model` is a plain transformers model; `write_more(folder)` adds what else resuming needs."""
    folder = checkpoint_path(run, step)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        if write_more is not None:
            write_more(tmp)
        torch.save({"optimizer": optimizer.state_dict(), **rng_states()}, tmp / "training_state.pt")
        write_json_atomic(tmp / "trainer_state.json", trainer_state)
    for _, old in complete_checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_training_state(folder: Path) -> tuple[dict, dict]:
    """(trainer_state, {"optimizer", "torch_rng", "cuda_rng"?}) of a checkpoint."""
    return read_json(folder / "trainer_state.json"), torch.load(folder / "training_state.pt", weights_only=True)


def rng_states() -> dict:
    """torch's random states (dropout draws from them, LoRA's among others)."""
    states = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda_rng"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(saved: dict) -> None:
    torch.set_rng_state(saved["torch_rng"])
    if "cuda_rng" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])


def check_resumable(saved_recipe: dict, recipe: dict, saved_data: dict, data: dict, folder: Path) -> None:
    """Refuse to resume when the recipe or the packed data changed in a way that would make the result wrong."""
    if "stages" in saved_recipe.get("train", {}):  # a checkpoint from before train.stages was named train.phases
        saved_recipe = {**saved_recipe, "train": {("phases" if k == "stages" else k): v
                                                  for k, v in saved_recipe["train"].items()}}
    changed = [key for key in sorted(set(flatten(saved_recipe)) | set(flatten(recipe)))
               if flatten(saved_recipe).get(key) != flatten(recipe).get(key)
               and not key.startswith(RESUME_SAFE_KEYS) and key != "name"]
    if changed:
        old, new = flatten(saved_recipe), flatten(recipe)
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3])
        raise GraftError(f"{folder}: made with a different recipe ({shown}); resuming would be wrong: "
                         f"run with --fresh to start over")
    if saved_data != data:
        raise GraftError(f"{folder}: the packed training data changed since this checkpoint; "
                         f"run with --fresh to start over")
