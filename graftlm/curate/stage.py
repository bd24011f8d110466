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
from graftlm.curate.dedup import ClusterSizeDedupFilter, buckets_step, cluster_step, minhash_config, signature_step
from graftlm.curate.executors import Job, run_jobs
from graftlm.curate.filters import FILTER_CLASSES, filter_settings, quality_filters
from graftlm.curate.langid import LanguageIdFilter, check_backend_knows, threshold_for
from graftlm.curate.reader import IntermediateReader, SourceReader
from graftlm.curate.rehydrate import Rehydrate, rehydration_table
from graftlm.curate.slurm import write_slurm_jobs
from graftlm.curate.stats import Meter, build_stats, progress_bytes
from graftlm.data.config import SourceConfig
from graftlm.data.read import resolve_paths
from graftlm.errors import DataError, GraftError, RecipeError
from graftlm.languages import language
from graftlm.progress import log
from graftlm.runs import atomic_dir, file_signature, fingerprint, inside, read_json, write_json_atomic
from graftlm.stage import Stage

CURATE_FORMAT = 1
EXECUTION_KEYS = {"sources", "executor", "executor_options", "submit", "workers", "tasks"}


class Curate(Stage):
    """One unit per curated source (`Recipe.curated_sources`)."""

    name = "curate"
    prepares_data = True
    recipe_keys = ("sources", "curate")
    outputs = ("curated",)

    def enabled(self):
        return self.recipe.curate is not None

    def units(self):
        names = self.recipe.curated_sources()
        if not names:
            log("curate: no target-language source has a `lang`, nothing to curate (see curate.sources)")
        return names

    def marker(self, unit):
        return self.run_dir.inside("curated", unit, "stats.json")

    def fingerprint(self, unit):
        source = self.recipe.sources[unit]
        return [CURATE_FORMAT, self.recipe.curate.model_dump(mode="json", exclude=EXECUTION_KEYS),
                source.model_dump(mode="json"), [file_signature(f) for f in resolve_paths(source, unit)]]

    def up_to_date(self, unit, key):
        done = super().up_to_date(unit, key)
        if done:
            shutil.rmtree(self.run_dir.curated / ".work" / unit, ignore_errors=True)  # what a Slurm run leaves
        return done

    def run(self, unit, key):
        stats = curate_source(self.recipe.name, unit, self.recipe.sources[unit], self.recipe.curate,
                              self.run_dir.curated, key)
        if stats["output"]["documents"] == 0:
            raise DataError(f"sources.{unit}: curation kept no document; see {self.marker(unit)} and "
                            f"{self.run_dir.curated / 'excluded' / unit}")


def curate_source(run_name: str, name: str, source: SourceConfig, config: CurateConfig, curated: Path,
                  key: str = "") -> dict:
    """Run the curation jobs of one source into `curated/<name>/`, stats.json (holding the fingerprint `key`)
    last."""
    lang = language(source.lang).code
    _check_word_tokenizer(name, lang)
    if config.language_id.enabled:
        check_backend_knows(config.language_id, lang)
    rehydration_table(config.rehydrate, config.max_repetitions, lang)  # FineWeb2 may have none for the language
    files = resolve_paths(source, name)
    final, work = inside(curated, name), inside(curated, ".work", name)
    tasks = config.tasks or config.workers
    _open_work_dir(work, fingerprint(key, tasks, config.executor))
    if (work / "submitted.json").is_file():
        raise GraftError(f"curate: the Slurm jobs that curate '{name}' are still running (logs: {work / 'logs'}); "
                         f"run again when they are done, or delete {work} to submit them again")
    header = {"source": name, "lang": lang, "fingerprint": key, "files": [file_signature(f) for f in files],
              "executor": config.executor, "tasks": tasks, "settings": _settings(config, lang)}
    jobs = plan_jobs(name, source, lang, config, work, tasks, files)
    finalize = Finalize(header, work, final, inside(curated, "excluded", name),
                        {j.name: str(j.logging_dir) for j in jobs})
    jobs.append(Job("finalize", [finalize], 1, work / "logs/finalize"))
    job_name = f"graft-{run_name}-{name}"
    if not config.submit:
        script = write_slurm_jobs(config, jobs, job_name, work / "slurm")
        raise GraftError(f"curate: wrote the Slurm jobs that curate '{name}' without submitting them "
                         f"(curate.submit is false): `bash {script}` submits them; run the same command again "
                         f"when they are done")
    run_jobs(config, jobs, job_name=job_name, label=name)
    if config.executor == "slurm":
        write_json_atomic(work / "submitted.json", {"jobs": [j.name for j in jobs]})
        raise GraftError(f"curate: submitted the curation of '{name}' to Slurm (logs: {work / 'logs'}); "
                         f"run the same command again when the jobs are done")
    stats = read_json(final / "stats.json")
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):
        work.parent.rmdir()  # .work/, once no source is left in it
    _log_summary(name, stats)
    return stats


def plan_jobs(name: str, source: SourceConfig, lang: str, config: CurateConfig, work: Path, tasks: int,
              files: list[str]) -> list[Job]:
    """The datatrove jobs that curate one source, in order (without the final one)."""

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
    jobs = [Job("filter", steps + [JsonlWriter(kept)], tasks, work / "logs/filter", work / "progress/read",
                lambda: sum(os.path.getsize(f) for f in files))]
    if not deduplicate:
        return jobs

    def kept_bytes() -> int:
        return progress_bytes(last_meter.progress_folder)

    def reread(job: str) -> list[PipelineStep]:
        return [IntermediateReader(kept, glob_pattern="*.jsonl.gz", add_file_path=False),
                Meter(progress_folder=str(work / "progress" / job))]

    minhash, folder = minhash_config(config.minhash), str(work / "minhash")
    duplicates = JsonlWriter(str(work / "excluded/minhash"), output_filename="duplicate/${rank}.jsonl.gz")
    return jobs + [
        Job("minhash_signatures", reread("signatures") + [signature_step(folder, config.minhash, lang)], tasks,
            work / "logs/signatures", work / "progress/signatures", kept_bytes),
        Job("minhash_buckets", [buckets_step(folder, minhash)], minhash.num_buckets, work / "logs/buckets"),
        Job("minhash_clusters", [cluster_step(folder, minhash)], 1, work / "logs/clusters"),
        Job("dedup_rehydrate", reread("dedup") + [ClusterSizeDedupFilter(folder, duplicates), Meter("minhash"),
                                                  Rehydrate(rehydration_table(config.rehydrate,
                                                                              config.max_repetitions, lang)),
                                                  Meter("rehydrate"), JsonlWriter(str(work / "output"))],
            tasks, work / "logs/dedup", work / "progress/dedup", kept_bytes),
    ]


class Finalize(PipelineStep):
    """The last job (one task, so that it also runs as the last Slurm job): stats.json from the jobs'
    counters, then the excluded documents and the output moved into place, stats.json last."""

    type = "🏁 - FINALIZE"
    name = "graftlm curated output"

    def __init__(self, header: dict, work: Path, final: Path, excluded: Path, job_logs: dict[str, str]):
        super().__init__()
        self.header, self.work, self.final, self.excluded = header, str(work), str(final), str(excluded)
        self.job_logs = job_logs

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> None:
        stats = build_stats(self.job_logs, self.header)
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


def _log_summary(name: str, stats: dict) -> None:
    dropped = ", ".join(f"{step['step']} {sum(step['dropped'].values()):,}" for step in stats["steps"]
                        if step.get("dropped"))
    unique = next((s["documents_out"] for s in stats["steps"] if s["step"] == "minhash"), None)
    log(f"curate: {name}: {stats['input']['documents']:,} documents ({stats['input']['bytes'] / 1e6:.1f} MB) -> "
        + (f"{unique:,} kept, " if unique is not None else "")
        + f"{stats['output']['documents']:,} written ({stats['output']['bytes'] / 1e6:.1f} MB) in "
        f"{stats['seconds']['total']:.1f}s ({stats['mb_per_s']:.2f} MB/s); dropped: {dropped or 'none'}")
