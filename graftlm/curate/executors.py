"""Running the curation jobs with datatrove's executors: local processes, Slurm jobs or Ray tasks.

Curation runs as a few jobs (filter, MinHash signatures, buckets, clusters, dedup, finalize), each one datatrove
executor with its own logging folder (task logs, per-task stats, completion marks). Local and Ray executors run a
job to its end before the next starts; Slurm executors are chained with `depends` and submitted at once (or
written out without submitting: graftlm/curate/slurm.py). A job that was interrupted resumes where it stopped:
datatrove skips the tasks it marked complete.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from datatrove.executor import LocalPipelineExecutor, RayPipelineExecutor
from datatrove.pipeline.base import PipelineStep

from graftlm.curate.config import CurateConfig
from graftlm.curate.stats import progress_bytes
from graftlm.errors import GraftError
from graftlm.progress import bytes_progress


@dataclass
class Job:
    """A datatrove pipeline run by one executor over `tasks` shards (a Slurm job array on a cluster)."""

    name: str
    pipeline: list[PipelineStep]
    tasks: int
    logging_dir: Path
    progress_folder: Path | None = None
    """Where the job's first Meter reports the bytes it saw, for a progress bar (None: a quick job)."""
    progress_total: Callable[[], int] = lambda: 0
    """The bytes the job will see, asked when it starts (after the jobs before it have run)."""


FORKSERVER_PRELOAD = ["__main__", "graftlm.curate.stage", "spacy", "pyvi.ViTokenizer"]
"""Imported once by the server that forks the worker processes of every job: spaCy (behind datatrove's word
tokenizers) and pyvi (Vietnamese) take seconds to import, a worker's whole share of a small corpus."""


class QuietLocalExecutor(LocalPipelineExecutor):
    """datatrove's LocalPipelineExecutor, with each task's log written to its log file only. datatrove also prints
    every task's log and stats table on the terminal, which would bury graftlm's progress bars."""

    def run(self):
        import multiprocess

        if self.start_method == "forkserver":
            multiprocess.set_forkserver_preload(FORKSERVER_PRELOAD)  # no effect once the server runs
        with quiet_datatrove():
            return super().run()

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        from datatrove.utils.logging import logger

        # datatrove adds a terminal sink (sys.stderr, read when the task starts) beside the task's log file
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            try:
                return super()._run_for_rank(rank, local_rank, node_rank)
            finally:
                logger.remove()  # the sinks datatrove left on the closed devnull


class QuietRayExecutor(RayPipelineExecutor):
    """datatrove's RayPipelineExecutor, without its log on this terminal (the tasks' logs are in the logging folder,
    and Ray is started with log_to_driver=False)."""

    def __init__(self, *args, **kwargs):
        with quiet_datatrove():  # a warning that the logging folder must be shared: the README says so
            super().__init__(*args, **kwargs)

    def run(self):
        with quiet_datatrove():
            return super().run()


@contextlib.contextmanager
def quiet_datatrove():
    """datatrove's log off the terminal while the block runs."""
    from datatrove.utils.logging import logger, setup_default_logger

    logger.remove()
    try:
        yield
    finally:
        setup_default_logger()


def make_executor(config: CurateConfig, job: Job, job_name: str, depends=None):
    common = dict(pipeline=job.pipeline, tasks=job.tasks, workers=min(config.workers, job.tasks),
                  logging_dir=str(job.logging_dir), **config.executor_options)
    if config.executor == "local":
        return QuietLocalExecutor(**common)
    if config.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        return SlurmPipelineExecutor(**common, job_name=f"{job_name}-{job.name}", depends=depends)
    try:
        import ray
    except ImportError:
        raise GraftError("curate.executor: ray needs the `ray` package (pip install 'graftlm[ray]')") from None
    if not ray.is_initialized():
        ray.init(log_to_driver=False)  # the cluster that RAY_ADDRESS names, or a Ray started here
    return QuietRayExecutor(**common)


def run_jobs(config: CurateConfig, jobs: list[Job], job_name: str, label: str) -> None:
    """Run the jobs in order (local, ray), or submit them as chained Slurm jobs."""
    if config.executor == "slurm":
        executor = None
        for job in jobs:
            executor = make_executor(config, job, job_name, depends=executor)
        executor.run()  # launches its dependencies first
        return
    with bytes_progress() as progress:
        for job in jobs:
            executor = make_executor(config, job, job_name)
            if job.progress_folder is None:  # a quick job: an indeterminate bar while it runs
                task = progress.add_task(f"curate {label}: {job.name}", total=None)
                executor.run()
                _check_complete(job, executor)
                progress.remove_task(task)
                continue
            total = job.progress_total()
            task = progress.add_task(f"curate {label}: {job.name}", total=total)
            with _polled(progress, task, job.progress_folder):
                executor.run()
            _check_complete(job, executor)
            progress.update(task, completed=total)


def _check_complete(job: Job, executor) -> None:
    """datatrove's Ray executor only warns when a task failed; the next job must not read a partial output."""
    failed = executor.get_incomplete_ranks(skip_completed=True)
    if failed:
        raise GraftError(f"curate: {len(failed)} of {executor.world_size} tasks of '{job.name}' failed "
                         f"(their logs: {job.logging_dir / 'logs'})")


@contextlib.contextmanager
def _polled(progress, task, folder: Path):
    """Moves the bar with the bytes the job's tasks report, while the executor runs in this thread."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.3):
            progress.update(task, completed=progress_bytes(folder))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
