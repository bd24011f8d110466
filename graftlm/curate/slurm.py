"""Slurm jobs written out instead of submitted (`curate.submit: false`, with `curate.executor: slurm`).

datatrove's SlurmPipelineExecutor submits each curation job as a job array (`sbatch`), followed by a small job
that merges the job's counters, each job waiting for the one before it (`--dependency=afterok:ID`). Here the
same executors run their own launch code, with the one call that runs `sbatch` replaced by a recorder: datatrove
still writes what the jobs read (each job's pickled pipeline, `executor.pik`, and `ranks_to_run.json`), so the
scripts run as they are. The folder gets one `NN-<job name>.sbatch` per job and `submit.sh`, which submits them
in order with the dependency chain (`bash submit.sh` on a login node); then `graft curate` again collects the result.
"""

from __future__ import annotations

import re
from pathlib import Path
from unittest import mock

from datatrove.executor import slurm as datatrove_slurm

from graftlm.curate.config import CurateConfig
from graftlm.curate.executors import Job, make_executor, quiet_datatrove
from graftlm.runs import atomic_dir

DEPENDENCY_LINE = re.compile(r"^#SBATCH --dependency=(.*)\n", re.MULTILINE)


def write_slurm_jobs(config: CurateConfig, curation_jobs: list[Job], job_name: str, folder: Path) -> Path:
    """Write the sbatch scripts of the curation jobs and `submit.sh` into `folder`; returns the path of submit.sh."""
    jobs: list[tuple[str, list[str]]] = []

    def record(contents: str, job_id_retriever, *args: str) -> str:
        jobs.append((contents, list(args)))
        return f"${{JOB_{len(jobs)}}}"  # the job id, once submit.sh has submitted the job

    executor = None
    for job in curation_jobs:
        executor = make_executor(config, job, job_name, depends=executor)
    # datatrove calls sbatch in this one module-level function, for the jobs' arrays and their merge jobs alike
    with mock.patch.object(datatrove_slurm, "launch_slurm_job", record), quiet_datatrove():
        executor.launch_job()  # launches its dependencies first

    lines = ["#!/bin/bash",
             f"# The Slurm jobs of graftlm's curation ({job_name}), written by `graft curate` (curate.submit: false).",
             "# Each job waits for the ones it depends on; run `graft curate` again when the last one is done.",
             "set -euo pipefail", 'cd "$(dirname "$0")"']
    with atomic_dir(folder) as tmp:
        for number, (contents, args) in enumerate(jobs, 1):
            # a merge job names its dependency inside the script, where the shell would not expand the job id
            args += [f"--dependency={dependency}" for dependency in DEPENDENCY_LINE.findall(contents)]
            contents = DEPENDENCY_LINE.sub("", contents)
            name = re.search(r"^#SBATCH --job-name=(.*)$", contents, re.MULTILINE).group(1)
            script = f"{number:02d}-{name}{'-merge_stats' if 'merge_stats ' in contents else ''}.sbatch"
            (tmp / script).write_text(contents)
            quoted = " ".join(f'"{arg}"' for arg in args)
            lines.append(f"JOB_{number}=$(sbatch --parsable {quoted} {script} | cut -d';' -f1)")
        lines.append('echo "submitted: ' + " ".join(f"${{JOB_{n}}}" for n in range(1, len(jobs) + 1)) + '"')
        (tmp / "submit.sh").write_text("\n".join(lines) + "\n")
    return folder / "submit.sh"
