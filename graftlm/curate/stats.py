"""What curation did, counted inside the pipeline and assembled into `curated/<source>/stats.json`.

A `Meter` step after every step counts the documents and UTF-8 bytes that step let through; datatrove saves each
task's counters in `<logging dir>/stats/<rank>.json`, whichever executor ran it, so the numbers are merged from
there. Wall times come from the same folders: an executor writes `executor.json` when it starts and
`completions/<rank>` when a task ends.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.stats import MetricStats, MetricStatsDict, PipelineStats, Stats

from graftlm.curate.langid import LanguageIdFilter
from graftlm.curate.reader import SourceReader
from graftlm.curate.rehydrate import Rehydrate

PROGRESS_ONLY = "progress"


class Meter(PipelineStep):
    """Counts `documents` and `bytes` passing through, under the name of the step before it. With a progress
    folder it also keeps `<folder>/<rank>` up to date with the bytes seen, for the progress bar."""

    type = "📏 - METER"

    def __init__(self, step: str = PROGRESS_ONLY, progress_folder: str | None = None):
        self.name = step  # before PipelineStep.__init__, which names the stats block after it
        super().__init__()
        self.progress_folder = progress_folder

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        seen, reported_at = 0, 0.0
        for doc in data:
            size = len(doc.text.encode("utf-8"))
            self.stat_update("documents")
            self.stat_update("bytes", value=size)
            seen += size
            if self.progress_folder and time.monotonic() - reported_at > 0.5:
                _report(self.progress_folder, rank, seen)
                reported_at = time.monotonic()
            yield doc
        if self.progress_folder:
            _report(self.progress_folder, rank, seen)


def _report(folder: str, rank: int, seen: int) -> None:
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{rank:05d}.tmp")
    with open(tmp, "w") as f:
        f.write(str(seen))
    os.replace(tmp, os.path.join(folder, f"{rank:05d}"))


def progress_bytes(folder: str | Path) -> int:
    """The bytes the tasks reporting into `folder` have seen so far."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    total = 0
    for path in folder.glob("[0-9]*"):
        try:
            total += int(path.read_text() or 0)
        except (OSError, ValueError):  # being replaced right now
            pass
    return total


# ---- reading the counters back -------------------------------------------------------------------------------


def merged_stats(logging_dir: str | Path) -> list[Stats]:
    """The counters of every finished task of one executor, added up: a block of counters per pipeline step."""
    total = PipelineStats()
    for path in sorted(Path(logging_dir, "stats").glob("*.json")):
        total += PipelineStats.from_json(json.loads(path.read_text()))
    for block in total.stats:  # counters read back from JSON stay plain numbers until added to another task's
        block.stats = MetricStatsDict(init={key: value if isinstance(value, MetricStats) else
                                            MetricStats.from_dict(value) for key, value in block.stats.items()})
    return total.stats


def wall_seconds(logging_dir: str | Path) -> tuple[float, float] | None:
    """(start, end) of an executor's run, as file modification times."""
    started, completions = Path(logging_dir, "executor.json"), list(Path(logging_dir, "completions").glob("*"))
    if not started.is_file() or not completions:
        return None
    return started.stat().st_mtime, max(p.stat().st_mtime for p in completions)


def _count(block: Stats, key: str) -> int:
    return int(block.stats[key].total) if key in block.stats else 0


def _block(stats: list[Stats], step_class: type[PipelineStep]) -> Stats | None:
    name = f"{step_class.type}: {step_class.name}"
    return next((block for block in stats if block.name == name), None)


def _with_prefix(block: Stats | None, prefix: str) -> dict[str, int]:
    if block is None:
        return {}
    return {key.removeprefix(prefix): int(value.total) for key, value in sorted(block.stats.items())
            if key.startswith(prefix) and value.total}


def step_table(stats: list[Stats]) -> list[dict]:
    """One entry per metered step: documents and bytes in and out, and why documents were dropped."""
    steps: list[dict] = []
    reasons: dict[str, int] = {}
    for block in stats:
        if not block.name.startswith(Meter.type):
            reasons.update(_with_prefix(block, "dropped_"))
            continue
        step = block.name.split(": ", 1)[1]
        if step == PROGRESS_ONLY:
            continue
        entry = {"step": step}
        if steps:
            entry.update(documents_in=steps[-1]["documents_out"], bytes_in=steps[-1]["bytes_out"])
        entry.update(documents_out=_count(block, "documents"), bytes_out=_count(block, "bytes"))
        if steps:
            dropped = entry["documents_in"] - entry["documents_out"]
            if dropped > 0:
                entry["dropped"] = reasons or {"duplicate" if step == "minhash" else step: dropped}
        steps.append(entry)
        reasons = {}
    return steps


def build_stats(job_logs: dict[str, str], header: dict) -> dict:
    """stats.json: `header` (source, fingerprint, settings...) and what the jobs counted."""
    blocks = [block for logs in job_logs.values() for block in merged_stats(logs)]
    steps = step_table(blocks)
    reader = _block(blocks, SourceReader)
    languages = {lang: {"documents": count, "bytes": _with_prefix(_block(blocks, LanguageIdFilter),
                                                                      "language_bytes_").get(lang, 0)}
                 for lang, count in _with_prefix(_block(blocks, LanguageIdFilter), "language_docs_").items()}
    clusters = {int(size): count for size, count in _with_prefix(_block(blocks, Rehydrate), "cluster_size_").items()}
    times = {job: wall for job, logs in job_logs.items() if (wall := wall_seconds(logs))}
    seconds = {job: round(end - start, 3) for job, (start, end) in times.items()}
    total_seconds = (max(end for _, end in times.values()) - min(start for start, _ in times.values())
                     if times else 0.0)
    read, written = steps[0], steps[-1]
    return {
        **header,
        "input": {"documents": read["documents_out"], "bytes": read["bytes_out"],
                  "empty": _count(reader, "empty") if reader else 0,
                  "skipped": _with_prefix(reader, "skipped_")},
        "output": {"documents": written["documents_out"], "bytes": written["bytes_out"]},
        "steps": steps,
        "languages": dict(sorted(languages.items(), key=lambda item: -item[1]["documents"])),
        "cluster_sizes": dict(sorted(clusters.items())),
        "seconds": {**seconds, "total": round(total_seconds, 3)},
        "mb_per_s": round(read["bytes_out"] / 1e6 / max(total_seconds, 1e-9), 3),
    }
