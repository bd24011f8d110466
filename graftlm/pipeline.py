"""`graft run`: the stages of a recipe in order (base, curate, vocab, pack, train, merge, report). Each stage reads
the outputs of the ones before it from the run directory and skips itself when its complete output is already
there."""

from __future__ import annotations

import time
from typing import Callable

from graftlm.progress import log
from graftlm.recipe import Recipe
from graftlm.runs import RunDir, read_json, remove_stale_tree, write_json_atomic


def _base(recipe: Recipe, run: RunDir) -> None:
    from graftlm.models import export_base

    export_base(recipe, run, log=log)


def _curate(recipe: Recipe, run: RunDir) -> None:
    if recipe.curate is None:
        return
    from graftlm.curate.stage import run_curate

    run_curate(recipe, run)


def _vocab(recipe: Recipe, run: RunDir) -> None:
    if recipe.vocab is None:
        return
    from graftlm.vocab.stage import run_vocab

    run_vocab(recipe, run)


def _pack(recipe: Recipe, run: RunDir) -> None:
    from graftlm.data.pack import pack_all

    pack_all(recipe, run)


def _train(recipe: Recipe, run: RunDir) -> None:
    from graftlm.train.loop import train

    train(recipe, run)


def _merge(recipe: Recipe, run: RunDir) -> None:
    from graftlm.merge.stage import run_merge

    run_merge(recipe, run)


def _report(recipe: Recipe, run: RunDir) -> None:
    from graftlm.progress import console
    from graftlm.report.page import build_report, verdict_table, wall_time

    verdict = build_report(recipe, run)
    console.print(verdict_table(verdict))
    if verdict is not None:
        log(verdict.summary())
    trained = read_json(run.model / "graft-train.json") if (run.model / "graft-train.json").is_file() else {}
    timings = read_json(run.timings) if run.timings.is_file() else {}
    if trained:
        log(f"tokens trained: {trained['tokens']:,}; wall time {wall_time(timings)}")
    log(f"report: {run.report}")


STAGES: dict[str, Callable[[Recipe, RunDir], None]] = {
    "base": _base,
    "curate": _curate,
    "vocab": _vocab,
    "pack": _pack,
    "train": _train,
    "merge": _merge,
    "report": _report,
}
PREPARE_STAGES = ("base", "curate", "vocab", "pack")
"""What `graft prepare` runs: everything up to packed training data."""


COMPLETION_MARKERS = {"base": "base/graft-base.json", "curate": "curated/*/stats.json",
                      "vocab": "vocab/stats.json", "pack": "packed/*/manifest.json",
                      "train": "model/graft-train.json", "merge": "merged/graft-merge.json"}
"""The files a stage writes last; a stage that leaves them untouched found its work done already."""


def run_stages(recipe: Recipe, run: RunDir, stages=tuple(STAGES)) -> None:
    """Run `stages` in order. The seconds of each stage that did work go to runs/<name>/timings.json (a stage that
    was up to date keeps the time it took when it did), so the report's wall time is the run's, not this call's."""
    from graftlm.checks import check_inputs

    check_inputs(recipe)  # a missing file or a seq_len too long is said now, not after the base export
    remove_stale_tree(run.root)  # what killed runs left half-written (*.tmp-PID, 517 MB each with the default model)
    run.write_recipe(recipe)
    timings = read_json(run.timings) if run.timings.is_file() else {}
    for name in stages:
        before = _completion_stamp(run, name)
        started = time.perf_counter()
        STAGES[name](recipe, run)
        if name not in COMPLETION_MARKERS or _completion_stamp(run, name) != before:
            timings[name] = round(time.perf_counter() - started, 2)
            write_json_atomic(run.timings, timings)


def _completion_stamp(run: RunDir, stage: str) -> list:
    pattern = COMPLETION_MARKERS.get(stage)
    return sorted((str(p), p.stat().st_mtime_ns) for p in run.root.glob(pattern)) if pattern else []
