"""The `curate` stage: each curated source through a datatrove pipeline, FineWeb2-style.

    read (graftlm's reader) → language ID → Gopher repetition → FineWeb quality → Gopher quality [→ C4]
        → MinHash signatures → buckets → clusters → dedup → rehydration → write

    runs/<name>/curated/<source>/*.jsonl.gz      the curated documents, text in "text" (what `pack` then reads)
    runs/<name>/curated/<source>/stats.json      written last: its presence means the source is done
    runs/<name>/curated/excluded/<source>/<step>/<reason>/*.jsonl.gz   every dropped document, for audit

Everything is built in `curated/.work/<source>/` (intermediate files, datatrove's logs and counters) and moved
into place at the end; an interrupted run resumes there. A source whose output was made from the same recipe
settings and the same input files is skipped. Execution settings (executor, workers, tasks) do not count: the
same documents come out either way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers import JsonlWriter

from graftlm.curate.config import CurateConfig
from graftlm.curate.dedup import (ClusterSizeDedupFilter, buckets_stage, cluster_stage, minhash_config,
                                  signature_stage)
from graftlm.curate.executors import Stage, run_stages
from graftlm.curate.filters import FILTER_CLASSES, filter_settings, quality_filters
from graftlm.curate.langid import LanguageIdFilter, check_backend_knows, threshold_for
from graftlm.curate.reader import IntermediateReader, SourceReader
from graftlm.curate.rehydrate import Rehydrate, rehydration_table
from graftlm.curate.stats import Meter, build_stats, progress_bytes
from graftlm.data.config import SourceConfig
from graftlm.data.read import resolve_paths
from graftlm.errors import DataError, GraftError, RecipeError
from graftlm.languages import language
from graftlm.progress import log
from graftlm.recipe import Recipe
from graftlm.runs import RunDir, atomic_dir, file_signature, fingerprint, read_json, write_json_atomic

CURATE_FORMAT = 1
EXECUTION_KEYS = {"sources", "executor", "executor_options", "workers", "tasks"}


def run_curate(recipe: Recipe, run: RunDir) -> dict[str, dict]:
    """Curate every source the recipe's `curate:` section names; returns each source's stats."""
    names = curated_sources(recipe)
    if not names:
        log("curate: no source has a `lang`, nothing to curate")
    return {name: curate_source(recipe.name, name, recipe.sources[name], recipe.curate, run.curated)
            for name in names}


def curated_sources(recipe: Recipe) -> list[str]:
    return recipe.curate.sources or [name for name, source in recipe.sources.items() if source.lang]


def curate_source(run_name: str, name: str, source: SourceConfig, config: CurateConfig, curated: Path) -> dict:
    lang = language(source.lang).code
    _check_word_tokenizer(name, lang)
    if config.language_id.enabled:
        check_backend_knows(config.language_id, lang)
    rehydration_table(config.rehydrate, config.max_repetitions, lang)  # FineWeb2 may have none for the language
    files = resolve_paths(source, name)
    key = fingerprint(CURATE_FORMAT, config.model_dump(mode="json", exclude=EXECUTION_KEYS),
                      source.model_dump(mode="json"), [file_signature(f) for f in files])
    final, work = curated / name, curated / ".work" / name
    if (final / "stats.json").is_file() and read_json(final / "stats.json").get("fingerprint") == key:
        shutil.rmtree(work, ignore_errors=True)  # what a Slurm run leaves behind
        log(f"curate: {name} is up to date ({final})")
        return _kept_something(name, read_json(final / "stats.json"), final)

    tasks = config.tasks or config.workers
    _open_work_dir(work, fingerprint(key, tasks, config.executor))
    if (work / "submitted.json").is_file():
        raise GraftError(f"curate: the Slurm jobs that curate '{name}' are still running (logs: {work / 'logs'}); "
                         f"run again when they are done, or delete {work} to submit them again")
    header = {"source": name, "lang": lang, "fingerprint": key, "files": [file_signature(f) for f in files],
              "executor": config.executor, "tasks": tasks, "settings": _settings(config, lang)}
    stages = plan_stages(name, source, lang, config, work, tasks, files)
    finalize = Finalize(header, work, final, curated / "excluded" / name, {s.name: str(s.logging_dir) for s in stages})
    stages.append(Stage("finalize", [finalize], 1, work / "logs/finalize"))
    run_stages(config, stages, job_name=f"graft-{run_name}-{name}", label=name)
    if config.executor == "slurm":
        write_json_atomic(work / "submitted.json", {"stages": [s.name for s in stages]})
        raise GraftError(f"curate: submitted the curation of '{name}' to Slurm (logs: {work / 'logs'}); "
                         f"run the same command again when the jobs are done")
    stats = read_json(final / "stats.json")
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):
        work.parent.rmdir()  # .work/, once no source is left in it
    _log_summary(name, stats)
    return _kept_something(name, stats, final)


def plan_stages(name: str, source: SourceConfig, lang: str, config: CurateConfig, work: Path, tasks: int,
                files: list[str]) -> list[Stage]:
    """The datatrove stages that curate one source, in order (without the final one)."""

    def excluded(step: str) -> JsonlWriter:
        return JsonlWriter(str(work / "excluded" / step), output_filename="${filter_reason}/${rank}.jsonl.gz")

    deduplicate = config.minhash.enabled
    kept = str(work / ("filtered" if deduplicate else "output"))
    steps: list[PipelineStep] = [SourceReader(name, source), Meter("read", str(work / "progress/read"))]
    if config.language_id.enabled:
        steps += [LanguageIdFilter(lang, config.language_id, excluded("language_id")), Meter("language_id")]
    for step_name, step in quality_filters(config.filters, lang, excluded):
        steps += [step, Meter(step_name)]
    last_meter = steps[-1]
    last_meter.progress_folder = last_meter.progress_folder or str(work / "progress/kept")
    stages = [Stage("filter", steps + [JsonlWriter(kept)], tasks, work / "logs/filter", work / "progress/read",
                    lambda: sum(os.path.getsize(f) for f in files))]
    if not deduplicate:
        return stages

    def kept_bytes() -> int:
        return progress_bytes(last_meter.progress_folder)

    def reread(stage: str) -> list[PipelineStep]:
        return [IntermediateReader(kept, glob_pattern="*.jsonl.gz", add_file_path=False),
                Meter(progress_folder=str(work / "progress" / stage))]

    minhash, folder = minhash_config(config.minhash), str(work / "minhash")
    duplicates = JsonlWriter(str(work / "excluded/minhash"), output_filename="duplicate/${rank}.jsonl.gz")
    return stages + [
        Stage("minhash_signatures", reread("signatures") + [signature_stage(folder, config.minhash, lang)], tasks,
              work / "logs/signatures", work / "progress/signatures", kept_bytes),
        Stage("minhash_buckets", [buckets_stage(folder, minhash)], minhash.num_buckets, work / "logs/buckets"),
        Stage("minhash_clusters", [cluster_stage(folder, minhash)], 1, work / "logs/clusters"),
        Stage("dedup_rehydrate", reread("dedup") + [ClusterSizeDedupFilter(folder, duplicates), Meter("minhash"),
                                                    Rehydrate(rehydration_table(config.rehydrate,
                                                                                config.max_repetitions, lang)),
                                                    Meter("rehydrate"),
                                                    JsonlWriter(str(work / "output"))],
              tasks, work / "logs/dedup", work / "progress/dedup", kept_bytes),
    ]


class Finalize(PipelineStep):
    """The last stage (one task, so that it also runs as the last Slurm job): stats.json from the stages'
    counters, then the excluded documents and the output moved into place, stats.json last."""

    type = "🏁 - FINALIZE"
    name = "graftlm curated output"

    def __init__(self, header: dict, work: Path, final: Path, excluded: Path, stage_logs: dict[str, str]):
        super().__init__()
        self.header, self.work, self.final, self.excluded = header, str(work), str(final), str(excluded)
        self.stage_logs = stage_logs

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> None:
        stats = build_stats(self.stage_logs, self.header)
        with atomic_dir(self.excluded) as tmp:
            _link_tree(Path(self.work, "excluded"), tmp)
        with atomic_dir(self.final) as tmp:
            _link_tree(Path(self.work, "output"), tmp)
            write_json_atomic(tmp / "stats.json", stats)


def _link_tree(source: Path, target: Path) -> None:
    """A second name in `target` for every file under `source` (a copy where hard links are not possible), so
    that a failure half-way leaves the work folder whole for a rerun."""
    for path in sorted(source.rglob("*.jsonl.gz")) if source.is_dir() else []:
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)


def _open_work_dir(work: Path, key: str) -> None:
    """The work folder of this fingerprint: kept to resume an interrupted run, emptied when settings changed."""
    marker = work / "fingerprint"
    if work.exists() and not (marker.is_file() and marker.read_text() == key):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(key)


def _check_word_tokenizer(name: str, lang: str) -> None:
    """The word tokenizer datatrove assigns the language exists and its package is installed (datatrove checks
    the package when the tokenizer is made), before any work."""
    from datatrove.utils.word_tokenizers import load_tokenizer_assignments, load_word_tokenizer

    found = language(lang)
    if found.fineweb2 not in load_tokenizer_assignments():
        raise RecipeError(f"sources.{name}.lang: datatrove assigns no word tokenizer to {found.name} "
                          f"({found.code}, {found.fineweb2}), which the quality filters need")
    try:
        load_word_tokenizer(found.fineweb2)
    except ImportError as e:
        raise RecipeError(f"sources.{name}.lang: the word tokenizer for {found.name} needs a package: {e}") from None


def _settings(config: CurateConfig, lang: str) -> dict:
    """The thresholds in force, language defaults resolved: recorded in stats.json."""
    lid = config.language_id
    return {
        "language_id": lid.enabled and {"backend": lid.backend, "model": lid.model, "max_chars": lid.max_chars,
                                        "threshold": threshold_for(lid, lang)},
        "filters": {name: filter_settings(config.filters, lang, name) for name in FILTER_CLASSES
                    if getattr(config.filters, name).enabled},
        "minhash": config.minhash.enabled and config.minhash.model_dump(exclude={"enabled"}),
        "rehydrate": config.minhash.enabled and rehydration_table(config.rehydrate, config.max_repetitions, lang),
    }


def _kept_something(name: str, stats: dict, final: Path) -> dict:
    if stats["output"]["documents"] == 0:
        raise DataError(f"sources.{name}: curation kept no document; see {final / 'stats.json'} and "
                        f"{final.parent / 'excluded' / name}")
    return stats


def _log_summary(name: str, stats: dict) -> None:
    dropped = ", ".join(f"{step['step']} {sum(step['dropped'].values()):,}" for step in stats["steps"]
                        if step.get("dropped"))
    unique = next((s["documents_out"] for s in stats["steps"] if s["step"] == "minhash"), None)
    log(f"curate: {name}: {stats['input']['documents']:,} documents ({stats['input']['bytes'] / 1e6:.1f} MB) -> "
        + (f"{unique:,} kept, " if unique is not None else "")
        + f"{stats['output']['documents']:,} written ({stats['output']['bytes'] / 1e6:.1f} MB) in "
        f"{stats['seconds']['total']:.1f}s ({stats['mb_per_s']:.2f} MB/s); dropped: {dropped or 'none'}")
