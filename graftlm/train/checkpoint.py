"""Checkpoints that make a resumed run repeat an uninterrupted one exactly.

    runs/<name>/checkpoints/step-000100/   a Hugging Face folder (config, model.safetensors, tokenizer) that
                                           `graft eval --model` loads, plus
        training_state.pt                  optimizer state and RNG states (loaded with weights_only=True)
        adapter/                           lora/layra: the adapter's exact weights (the folder's own weights are
                                           merged, for evaluation)
        ema.safetensors                    with train.ema: the moving average
        trainer_state.json                 step, tokens, the phase, the sampler's position, counters, the recipe
        manifest.json                      the size and xxh3-128 hash of every other file; written last

With `train.distributed.strategy: fsdp`, dcp/ (the sharded model, optimizer and EMA, torch.distributed.checkpoint)
and rng-<rank>.pt take the place of training_state.pt and ema.safetensors (see train/sharding.py).

Each checkpoint is written into a temporary folder and renamed when complete, so a run killed at any moment leaves
only complete checkpoints behind. A checkpoint damaged afterwards (a file truncated, emptied, deleted or changed)
proves it by not matching its manifest: `complete_checkpoints` compares sizes (a stat per file),
`latest_valid_checkpoint` also the hashes (about 0.1 s per 500 MB from the page cache); a checkpoint that fails is
reported in one line and moved aside to runs/<name>/corrupt/, and training resumes from the newest one that holds.

A checkpoint written because of a signal (trainer_state.json `"preemption": true`) is off the schedule: it is there
to resume from, so it does not count among the `train.keep_checkpoints` kept, is removed once a newer one is written,
and is not averaged by `merge.average_last` (a preempted run keeps and averages what an uninterrupted one does).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from graftlm.errors import GraftError
from graftlm.model_files import check_safetensors
from graftlm.models import save_tokenizer
from graftlm.progress import log
from graftlm.runs import (RunDir, atomic_dir, disk_full, disk_full_as_oserror, flatten, read_json, remove_stale,
                          write_json_atomic)
from graftlm.train.config import DistributedConfig

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
HASH = "xxh3_128"

RESUME_SAFE_KEYS = ("eval", "train.checkpoint_every", "train.keep_checkpoints", "train.max_bad_steps",
                    "train.micro_batch_size", "train.ema.export", "train.distributed.reshard_after_forward",
                    "train.distributed.cpu_offload", "merge", "report")
"""Recipe keys that may change between an interrupted run and its resumption without making it wrong."""


def checkpoint_path(run: RunDir, step: int) -> Path:
    return run.checkpoints / f"step-{step:06d}"


def complete_checkpoints(run: RunDir) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint whose files have the sizes its manifest says, oldest first. One
    that does not is reported and moved aside; the leftovers of a killed write are removed."""
    if not run.checkpoints.is_dir():
        return []
    remove_stale(run.checkpoints)
    found = []
    for folder in sorted(run.checkpoints.iterdir()):
        match = STEP_DIR.match(folder.name)
        if not match or not folder.is_dir():
            continue
        problem = checkpoint_problem(folder, hashes=False)
        if problem is None:
            found.append((int(match.group(1)), folder))
        elif problem != INCOMPLETE:
            move_aside(run, folder, problem)
    return sorted(found)


def latest_valid_checkpoint(run: RunDir) -> Path | None:
    """The newest checkpoint whose every file matches its manifest's hash (what resuming should start from), or
    None; a newer one that fails is reported in one line and moved aside."""
    for _, folder in reversed(complete_checkpoints(run)):
        problem = checkpoint_problem(folder, hashes=True)
        if problem is None:
            return folder
        move_aside(run, folder, problem)
    return None


INCOMPLETE = "no trainer_state.json"


def checkpoint_problem(folder: Path, hashes: bool = True) -> str | None:
    """What is wrong with a checkpoint folder, or None. With a manifest: a file missing, of another size or (with
    `hashes`) another hash. Without one (a checkpoint of an older graftlm): the files must parse."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        if not (folder / "trainer_state.json").is_file():
            return INCOMPLETE
        return _unverified_problem(folder)
    try:
        files = read_json(manifest_path)["files"]
        entries = [(name, int(entry["size"]), str(entry[HASH])) for name, entry in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is damaged ({type(e).__name__}: {e})"
    for name, size, digest in entries:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} bytes, its manifest says {size:,}"
    try:
        read_json(folder / "trainer_state.json")
    except (OSError, ValueError) as e:
        return f"trainer_state.json is not valid JSON ({e})"
    for name, _, digest in entries if hashes else []:
        if file_hash(folder / name) != digest:
            return f"{name} does not match its manifest's hash (its bytes changed)"
    return None


def _unverified_problem(folder: Path) -> str | None:
    """A checkpoint without a manifest: what can be checked of its files' structure."""
    try:
        read_json(folder / "trainer_state.json")
    except (OSError, ValueError) as e:
        return f"trainer_state.json is not valid JSON ({e})"
    state = folder / "training_state.pt"
    if not state.is_file() or not zipfile.is_zipfile(state):
        return "training_state.pt is missing or cut short"
    for weights in folder.rglob("*.safetensors"):
        try:
            check_safetensors(weights)
        except GraftError as e:
            return str(e).removeprefix(f"{weights}: ")
    return None


def move_aside(run: RunDir, folder: Path, problem: str) -> Path:
    """Move a damaged checkpoint to runs/<name>/corrupt/ (kept for inspection, out of training's way)."""
    run.corrupt.mkdir(parents=True, exist_ok=True)
    target = run.corrupt / folder.name
    n = 1
    while target.exists():
        n += 1
        target = run.corrupt / f"{folder.name}-{n}"
    folder.rename(target)
    log(f"warning: checkpoint {folder}: {problem}; moved aside to {target}")
    return target


def file_hash(path: Path) -> str:
    import xxhash

    digest = xxhash.xxh3_128()
    buffer = bytearray(1 << 22)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """The size and hash of every file under `folder`, written last: a checkpoint's proof of itself."""
    files = {str(path.relative_to(folder)): {"size": path.stat().st_size, HASH: file_hash(path)}
             for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}
    write_json_atomic(folder / MANIFEST, {"format": 1, "files": files})


def save_checkpoint(run: RunDir, step: int, model, tokenizer, optimizer: torch.optim.Optimizer | None,
                    trainer_state: dict[str, Any], keep: int, write_more: Callable[[Path], None] | None = None,
                    training_state: Callable[[Path], None] | None = None) -> Path:
    """`model` is a plain transformers model; `write_more(folder)` adds what else resuming needs;
    `training_state(folder)` writes the optimizer and random states instead of training_state.pt (the sharded
    checkpoints of train/sharding.py, which every process writes into the same temporary folder)."""
    folder = checkpoint_path(run, step)
    needed, known = _checkpoint_bytes(run, model)
    if known:  # the same size as the last one: a disk without that much room is said before writing
        folder.parent.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(folder.parent).free < needed:
            raise disk_full(folder, needed)
    with atomic_dir(folder) as tmp, disk_full_as_oserror(folder, needed):
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        if write_more is not None:
            write_more(tmp)
        if training_state is not None:
            training_state(tmp)
        else:
            torch.save({"optimizer": optimizer.state_dict(), **rng_states()}, tmp / "training_state.pt")
        write_json_atomic(tmp / "trainer_state.json", trainer_state)
        write_manifest(tmp)
    for old in _stale(complete_checkpoints(run), keep):
        shutil.rmtree(old, ignore_errors=True)
    return folder


def is_preemption(folder: Path) -> bool:
    try:
        return bool(read_json(folder / "trainer_state.json").get("preemption"))
    except (OSError, ValueError, AttributeError):  # damaged: resuming will say so and move it aside
        return False


def _stale(checkpoints: list[tuple[int, Path]], keep: int) -> list[Path]:
    """What rotation removes: the scheduled checkpoints beyond the newest `keep`, and a preemption checkpoint once
    a newer checkpoint exists (so a finished run has none left for `merge.average_last` to average)."""
    folders = [folder for _, folder in checkpoints]
    preempted = {folder for folder in folders if is_preemption(folder)}
    scheduled = [folder for folder in folders if folder not in preempted]
    return scheduled[:-keep] + [folder for folder in folders[:-1] if folder in preempted]


def _checkpoint_bytes(run: RunDir, model) -> tuple[int, bool]:
    """About how much a checkpoint takes, and whether that is known: the newest one's size, else a guess (the
    weights and two Adam moments)."""
    for _, folder in reversed(complete_checkpoints(run)):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            return sum(entry["size"] for entry in read_json(folder / MANIFEST)["files"].values()), True
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters()), False


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
    if "distributed" not in saved_recipe.get("train", {"distributed": None}):  # from before train.distributed
        saved_recipe = {**saved_recipe, "train": {**saved_recipe["train"],
                                                  "distributed": DistributedConfig().model_dump(mode="json")}}
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
