"""Curation on clusters (graftlm/curate/executors.py, graftlm/curate/slurm.py): datatrove's Ray executor on a real
Ray cluster started here (a head and a second node, one CPU each) writes the same documents and counters as the
Local executor; the Slurm jobs written without submitting (`curate.submit: false`) are checked line by line, and
run by a stand-in for sbatch/srun to the same output as the Local executor.

What legitimately differs between two executors' outputs: the 4-byte modification time in each gzip header, and
in stats.json the `executor`, `seconds` and `mb_per_s` fields. Everything else must be identical byte for byte.
"""

import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import dill
import pytest

from conftest import REPO
from test_curate import ID_DOCS, VI_DOCS, perturb, write_jsonl

from graftlm.curate.config import CurateConfig
from graftlm.curate.stage import curate_source
from graftlm.data.config import SourceConfig
from graftlm.errors import GraftError

VARYING_STATS = ("executor", "seconds", "mb_per_s")
SLURM_OPTIONS = {"partition": "cpu", "time": "1:00:00"}


def corpus(tmp_path: Path) -> Path:
    """Indonesian handbook pages with copies and near-copies (for MinHash) and Vietnamese pages (for language ID)."""
    rng = random.Random(0)
    docs = ID_DOCS[:24]
    vocabulary = " ".join(docs).split()
    texts = docs + [docs[2], docs[2], perturb(docs[5], rng, vocabulary), docs[7]] + VI_DOCS[:3]
    return write_jsonl(tmp_path / "id.jsonl", texts)


def recipe(folder: Path, data: Path, curate: dict) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(f"name: cluster\nsources:\n  id: {{paths: ['{data}'], lang: id}}\ncurate: {json.dumps(curate)}\n")
    return path


def digest(curated: Path) -> dict[str, str]:
    """sha256 of every file the curation wrote: gzip files with their header's time zeroed, stats.json without
    the fields that depend on the executor and the clock."""
    out = {}
    for path in sorted(p for p in curated.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix == ".gz":
            assert data[:3] == b"\x1f\x8b\x08"
            data = data[:4] + bytes(4) + data[8:]  # MTIME (RFC 1952); the rest of the header is the same
        elif path.name == "stats.json":
            stats = json.loads(data)
            data = json.dumps({k: v for k, v in stats.items() if k not in VARYING_STATS}, sort_keys=True).encode()
        out[str(path.relative_to(curated))] = hashlib.sha256(data).hexdigest()
    return out


def graft_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


# ---- Ray ------------------------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class RayCluster:
    """A Ray cluster on this machine: a head and a second node of one CPU each, started by `ray start --block`,
    whose processes live as long as that command's: the test stops its own cluster and no other."""

    def __init__(self, folder: Path):
        self.ray = Path(sys.executable).parent / "ray"
        self.temp_dir = Path(f"/tmp/graft-ray-{os.getpid()}")  # Ray's socket paths must stay short
        self.logs, self.nodes = [folder / "head.log", folder / "node.log"], []
        self.head_port = free_ports(1)[0]
        self.address = f"127.0.0.1:{self.head_port}"
        self.nodes.append(self._start(["--head", f"--port={self.head_port}", "--include-dashboard=false",
                                       f"--dashboard-port={free_ports(1)[0]}", f"--temp-dir={self.temp_dir}"],
                                      self.logs[0]))

    def _start(self, args: list[str], log: Path) -> subprocess.Popen:
        agent, agent_grpc, runtime_env, metrics, node_manager, object_manager, workers = free_ports(7)
        command = [str(self.ray), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                   "--object-store-memory=100000000", "--disable-usage-stats",
                   f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                   f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
                   f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
                   f"--min-worker-port={workers}", f"--max-worker-port={workers + 40}", *args]
        return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                                env=graft_env(RAY_USAGE_STATS_ENABLED="0"))

    def wait(self, timeout: float = 120) -> str:
        """Once the head runs, start the second node; returns the address once both nodes are alive."""
        import ray

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and all(node.poll() is None for node in self.nodes):
            try:
                ray.init(address=self.address, log_to_driver=False)
            except ConnectionError:
                time.sleep(1)
                continue
            try:
                if len(self.nodes) == 1:
                    self.nodes.append(self._start([f"--address={self.address}"], self.logs[1]))
                while time.monotonic() < deadline and all(node.poll() is None for node in self.nodes):
                    if sum(node["Alive"] for node in ray.nodes()) == 2:
                        return self.address
                    time.sleep(0.5)
            finally:
                ray.shutdown()
        raise AssertionError("the Ray cluster did not start:\n" + "\n".join(
            log.read_text()[-2000:] for log in self.logs if log.exists()))

    def stop(self) -> None:
        for node in reversed(self.nodes):  # `ray start --block` stops its node's processes on SIGTERM
            node.terminate()
        for node in reversed(self.nodes):
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_cluster(tmp_path):
    pytest.importorskip("ray", reason="the Ray executor test needs the `ray` package: pip install 'graftlm[ray]'")
    cluster = RayCluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_ray_cluster_curates_the_same_bytes_as_local(tmp_path, ray_cluster):
    data = corpus(tmp_path)
    settings = {"workers": 2, "tasks": 2, "minhash": {"num_buckets": 2, "hashes_per_bucket": 8, "words": "whitespace"}}
    # the reference, while the cluster starts: one worker, in this process (the same tasks, so the same shards)
    local = curate_source("cluster", "id", SourceConfig(paths=[str(data)], lang="id"),
                          CurateConfig.model_validate({**settings, "workers": 1}), tmp_path / "local/curated")
    assert local["executor"] == "local"

    (tmp_path / "ray").mkdir()
    ray_recipe = recipe(tmp_path / "ray", data, {**settings, "executor": "ray",
                                                 "executor_options": {"mem_per_cpu_gb": 0.5}})
    result = subprocess.run([sys.executable, "-m", "graftlm", "curate", str(ray_recipe), "--runs-dir",
                             str(tmp_path / "ray/runs")], capture_output=True, text=True, timeout=300,
                            env=graft_env(RAY_ADDRESS=ray_cluster.wait(), RAY_USAGE_STATS_ENABLED="0"))
    assert result.returncode == 0, result.stderr[-3000:]

    ray_out = tmp_path / "ray/runs/cluster/curated"
    ray_stats = json.loads((ray_out / "id/stats.json").read_text())
    assert ray_stats["executor"] == "ray"
    # the pipeline did something: language ID, the quality filters and MinHash each dropped documents
    dropped = {step["step"] for step in ray_stats["steps"] if step.get("dropped")}
    assert {"language_id", "gopher_repetition", "minhash"} <= dropped and ray_stats["output"]["documents"] > 0
    assert digest(ray_out) == digest(tmp_path / "local/curated")
    print("digests (local == ray):", json.dumps(digest(ray_out), indent=1))


# ---- Slurm ----------------------------------------------------------------------------------------------------


def write_slurm(tmp_path: Path, curate: dict) -> Path:
    """Curate with executor slurm and submit false; returns the folder of the sbatch scripts."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = corpus(tmp_path)
    config = CurateConfig.model_validate({"executor": "slurm", "submit": False, "executor_options": SLURM_OPTIONS,
                                          **curate})
    with pytest.raises(GraftError, match=r"wrote the Slurm jobs that curate 'id' without submitting.*submit\.sh"):
        curate_source("cluster", "id", SourceConfig(paths=[str(data)], lang="id"), config, tmp_path / "curated")
    assert not (tmp_path / "curated/id").exists()
    return tmp_path / "curated/.work/id/slurm"


def sbatch_directives(script: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script.read_text(), re.MULTILINE))


FAKE_SBATCH = """#!/bin/bash
# sbatch's stand-in: records "ID ARGS" and prints ID the way --parsable does. With FAKE_SLURM_RUN set it also runs
# the job's array tasks at once (in parallel), as Slurm would once the jobs it depends on are done: submit.sh
# submits in dependency order.
script="${@: -1}"
id=$((1000 + $(wc -l < "$FAKE_SLURM_LOG")))
echo "$id $*" >> "$FAKE_SLURM_LOG"
if [ -n "${FAKE_SLURM_RUN:-}" ] && ! grep -q '^merge_stats ' "$script"; then
  last=$(sed -n 's/^#SBATCH --array=0-\\([0-9]*\\).*/\\1/p' "$script")
  pids=()
  for i in $(seq 0 "$last"); do
    SLURM_ARRAY_TASK_ID=$i SLURM_JOB_ID=$id RUN_OFFSET=0 SLURM_NODELIST=localhost bash "$script" \\
      >> "$FAKE_SLURM_LOG.out" 2>&1 & pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || { echo "job $id failed" >&2; exit 1; }; done
fi
echo "$id;test"
"""
FAKE_SRUN = '#!/bin/bash\nwhile [ "$1" != launch_pickled_pipeline ]; do shift; done\nexec "$@"\n'
FAKE_SCONTROL = '#!/bin/bash\necho "$3"\n'  # scontrol show hostnames NODELIST


def submit(folder: Path, tmp_path: Path, run: bool) -> list[tuple[str, list[str]]]:
    """Run submit.sh with the stand-ins on PATH; returns (job id, sbatch arguments) in submission order."""
    bin_dir = tmp_path / "fake-slurm"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "sbatch.log"
    log.write_text("")
    env = graft_env(PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    FAKE_SLURM_LOG=str(log), **({"FAKE_SLURM_RUN": "1"} if run else {}))
    result = subprocess.run(["bash", str(folder / "submit.sh")], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr + (log.with_suffix(".log.out").read_text() if run else "")
    return [(line.split()[0], line.split()[1:]) for line in log.read_text().splitlines()]


def test_slurm_jobs_are_written_without_submitting(tmp_path):
    folder = write_slurm(tmp_path, {"workers": 2, "tasks": 3, "minhash": {"num_buckets": 4}})
    jobs = ["filter", "minhash_signatures", "minhash_buckets", "minhash_clusters", "dedup_rehydrate", "finalize"]
    scripts = sorted(folder.glob("*.sbatch"))
    assert [s.name for s in scripts] == [f"{2 * i + 1 + merge:02d}-graft-cluster-id-{job}{'-merge_stats' * merge}"
                                         ".sbatch" for i, job in enumerate(jobs) for merge in (0, 1)]
    arrays = {"filter": "0-2%2", "minhash_signatures": "0-2%2", "minhash_buckets": "0-3%2",
              "minhash_clusters": "0-0%1", "dedup_rehydrate": "0-2%2", "finalize": "0-0%1"}
    work = tmp_path / "curated/.work/id"
    for job, script in zip(jobs, scripts[::2]):
        directives = sbatch_directives(script)
        assert directives["partition"] == "cpu" and directives["time"] == "1:00:00"
        assert directives["job-name"] == f"graft-cluster-id-{job}" and directives["array"] == arrays[job]
        assert "dependency" not in directives  # on the sbatch command line, where the shell expands the job id
        pickled = re.search(r"launch_pickled_pipeline (\S+)$", script.read_text(), re.MULTILINE).group(1)
        executor = dill.loads(Path(pickled).read_bytes())  # what the job will run: written, not a placeholder
        assert Path(pickled).parent.parent == work / "logs" and executor.job_name == directives["job-name"]
        assert json.loads((Path(pickled).parent / "ranks_to_run.json").read_text()) == \
            list(range(int(arrays[job].split("-")[1].split("%")[0]) + 1))
    assert type(executor.pipeline[0]).__name__ == "Finalize"

    jobs = submit(folder, tmp_path, run=False)
    assert [args[-1] for _, args in jobs] == [s.name for s in scripts]
    dependencies = [[a.split("=", 1)[1] for a in args if a.startswith("--dependency=")] for _, args in jobs]
    ids = [job_id for job_id, _ in jobs]
    # each job waits for the job before it, each merge job for its job
    assert dependencies[0] == [] and all(dependencies[i] == [f"afterok:{ids[i - 1]}"] for i in range(1, 12, 2))
    assert all(dependencies[i] == [f"afterok:{ids[i - 2]}"] for i in range(2, 12, 2))
    assert not (work / "submitted.json").exists() and not (tmp_path / "curated/id").exists()


def test_slurm_scripts_run_to_the_local_output(tmp_path):
    # a process per task, each loading what it needs: the filters that split words (spaCy loads in seconds) and
    # MinHash run in the Ray test
    settings = {"workers": 1, "tasks": 2, "minhash": False,
                "filters": {"gopher_repetition": False, "fineweb_quality": False, "gopher_quality": False}}
    folder = write_slurm(tmp_path / "slurm", settings)
    submit(folder, tmp_path, run=True)
    data = tmp_path / "slurm/id.jsonl"
    config = CurateConfig.model_validate({"executor": "slurm", "executor_options": SLURM_OPTIONS, **settings})
    stats = curate_source("cluster", "id", SourceConfig(paths=[str(data)], lang="id"), config,
                          tmp_path / "slurm/curated")  # done by the jobs: collected, not submitted again
    assert stats["executor"] == "slurm"
    local = curate_source("cluster", "id", SourceConfig(paths=[str(data)], lang="id"),
                          CurateConfig.model_validate(settings), tmp_path / "local/curated")
    assert local["output"] == stats["output"]
    assert digest(tmp_path / "slurm/curated") == digest(tmp_path / "local/curated")



def test_a_job_with_a_failed_task_stops_the_curation(tmp_path):
    """datatrove's Ray executor returns when a task failed: the next job would read a partial output."""
    from datatrove.executor import RayPipelineExecutor

    from graftlm.curate.executors import Job, _check_complete

    job = Job("filter", [], 2, tmp_path / "logs")
    executor = RayPipelineExecutor([], tasks=2, logging_dir=str(job.logging_dir))
    executor.mark_rank_as_completed(0)
    with pytest.raises(GraftError, match=r"1 of 2 tasks of 'filter' failed \(their logs: .*logs/logs\)"):
        _check_complete(job, executor)
    executor.mark_rank_as_completed(1)
    _check_complete(job, executor)
