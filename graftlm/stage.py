"""The stage contract, and the runner that alone decides what runs.

A stage (base, curate, vocab, pack, train, merge, report) is a small object: its name, the stages whose outputs it
reads, the inputs its output depends on (its fingerprint), the file it completes with (its marker) and `run()`.
`bring_up_to_date` brings the asked stages up to date the way make does: the stages they depend on first, each one
skipped when its marker holds the fingerprint of its current inputs, timed when it does work. A stage that works
per source (curate, pack) has one unit per source, each with its own marker, so that one changed source redoes
only its own work.

    class Pack(Stage):
        name, needs = "pack", ("base", "curate", "vocab")
        def units(self): return list(self.recipe.sources)
        def marker(self, unit): return self.run_dir.packed / unit / "manifest.json"
        def fingerprint(self, unit): return [...]
        def run(self, unit, key): ...   # packs, then writes manifest.json with {"fingerprint": key} last

Under `accelerate launch` every process runs the runner; a stage that is not `distributed` runs on the main
process only, the others wait for it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from graftlm.errors import GraftError
from graftlm.progress import log
from graftlm.runs import RunDir, fingerprint, read_json, write_json_atomic
from graftlm.signals import stop_if_requested

if TYPE_CHECKING:
    from graftlm.recipe import Recipe


class Stage:
    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    """Stages whose outputs this one reads: they are brought up to date first."""
    prepares_data: ClassVar[bool] = False
    """Part of the prepared data (base, curated text, vocabulary, packed shards) that `graft compare` shares
    between the variants of a recipe."""
    outputs: ClassVar[tuple[str, ...]] = ()
    """Its output folders and files, as names of RunDir attributes (`packed`, `model`)."""
    recipe_keys: ClassVar[tuple[str, ...]] = ()
    """Top-level recipe keys the stage reads; a compare variant that changes one prepares its own data."""
    distributed: ClassVar[bool] = False
    """Every process takes part (training); otherwise the main process runs the stage alone."""

    def __init__(self, recipe: "Recipe", run_dir: RunDir, fresh: bool = False, **options: Any):
        self.recipe, self.run_dir = recipe, run_dir
        self.fresh = fresh
        """Redo the work even when the marker says it is up to date."""
        self.options = options
        self.stages: dict[str, type[Stage]] = {}
        """The pipeline this stage runs in (set by the runner): a stage that runs others (plan) asks it."""

    def enabled(self) -> bool:
        """False when the recipe leaves the stage out (no `curate:` section, ...)."""
        return True

    def when_disabled(self) -> None:
        """Called instead of `run` when the stage is left out: remove what an earlier recipe made, if that would
        otherwise be taken for the run's result."""

    def units(self) -> Sequence[str | None]:
        """The parts that complete on their own (sources); one part, None, by default."""
        return [None]

    def marker(self, unit: str | None) -> Path | None:
        """The file that says a unit is complete; None: the stage runs every time (report)."""
        return None

    def fingerprint(self, unit: str | None) -> list:
        """What the unit's output depends on (JSON-able): recipe keys, input file signatures, upstream results."""
        return []

    def describe(self, unit: str | None) -> str:
        """How the unit is named in messages."""
        return self.name if unit is None else f"{self.name} {unit}"

    def run(self, unit: str | None, key: str) -> None:
        """Do the work, and write the marker last, holding `"fingerprint": key` (inside the output folder that
        appears atomically, so that output and marker appear together)."""
        raise NotImplementedError

    def up_to_date(self, unit: str | None, key: str) -> bool:
        marker = self.marker(unit)
        return not self.fresh and marker is not None and _read_marker(marker).get("fingerprint") == key


def _read_marker(path: Path) -> dict:
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return {}  # a torn or unreadable marker: the unit is redone
    return record if isinstance(record, dict) else {}


def ordered(names: Sequence[str], stages: dict[str, type[Stage]]) -> list[str]:
    """`names` with every stage they depend on, in the registry's order (which lists dependencies first)."""
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise GraftError(f"unknown stage {unknown[0]!r} (stages: {', '.join(stages)})")
    wanted: set[str] = set()

    def add(name: str) -> None:
        if name not in wanted:
            wanted.add(name)
            for need in stages[name].needs:
                add(need)

    for name in names:
        add(name)
    return [name for name in stages if name in wanted]


def bring_up_to_date(recipe: "Recipe", run_dir: RunDir, stages: dict[str, type[Stage]], names: Sequence[str],
                     options: dict[str, dict] | None = None, needs: bool = True) -> None:
    """Bring the stages `names` (and, with `needs`, the stages they depend on) up to date, in order.

    The seconds of each stage that did work go to runs/<name>/timings.json (a stage that was up to date keeps the
    time it took when it did), so the report's wall time is the run's, not this call's. `options[name]` are keyword
    arguments for that stage (`fresh=True`, the trainer's callbacks)."""
    group = _ProcessGroup()
    if group.main:
        run_dir.write_recipe(recipe)
    timings = read_json(run_dir.timings) if group.main and run_dir.timings.is_file() else {}
    for name in ordered(names, stages) if needs else [n for n in stages if n in names]:
        stop_if_requested()  # a signal that came when training could no longer stop
        stage = stages[name](recipe, run_dir, **(options or {}).get(name, {}))
        stage.stages = stages
        if not stage.distributed and not group.main:
            group.wait()
            continue
        started = time.perf_counter()
        worked = _run_stage(stage, group.main)
        if worked and group.main:
            timings[name] = round(time.perf_counter() - started, 2)
            write_json_atomic(run_dir.timings, timings)
        if not stage.distributed:
            group.wait()


def link_prepared(parent: RunDir, run: RunDir, stages: dict[str, type[Stage]]) -> None:
    """Make `run` share `parent`'s prepared data: its base/, curated/, vocab/, packed/ become links to the
    parent's (compare variants, plan pilots). Then run only the stages after them, with `needs=False`."""
    run.root.mkdir(parents=True, exist_ok=True)
    for stage in stages.values():
        for output in stage.outputs if stage.prepares_data else ():
            link, target = getattr(run, output), getattr(parent, output)
            if target.exists() and not link.exists():
                link.symlink_to(os.path.relpath(target, run.root), target_is_directory=True)


def _run_stage(stage: Stage, main: bool) -> bool:
    """Run the units of one stage that are not up to date; True when any did work."""
    if not stage.enabled():
        stage.when_disabled()
        return False
    worked = False
    for unit in stage.units():
        key = fingerprint(*stage.fingerprint(unit))
        if stage.up_to_date(unit, key):
            log(f"{stage.describe(unit)}: up to date")
            continue
        stage.run(unit, key)
        worked = True
        marker = stage.marker(unit)
        if main and marker is not None and _read_marker(marker).get("fingerprint") != key:
            raise GraftError(f"{stage.describe(unit)}: finished without writing its marker {marker}")
    return worked


class _ProcessGroup:
    """The processes of an `accelerate launch` (torchrun) job, or this process alone."""

    def __init__(self) -> None:
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.main = os.environ.get("RANK", "0") == "0"
        self._state = None
        if self.size > 1:
            import torch
            from accelerate import PartialState

            # the same state the trainer's Accelerator takes over (cpu=True: a gloo group of CPU processes)
            self._state = PartialState(cpu=not torch.cuda.is_available())

    def wait(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()
