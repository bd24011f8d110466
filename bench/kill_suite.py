"""Kill `graft run` at random moments of every stage, run it again, and check that it ends exactly where an
uninterrupted run ends: the same weights, tensor for tensor (model/ and merged/), the same logged losses and
evaluations.

    .venv/bin/python bench/kill_suite.py [--kills 20] [--terms 5] [--seed 0] [--workdir DIR] [--keep]

The recipe is tiny (a random 4-block Llama with SmolLM2's tokenizer; 40 Vietnamese and 20 English bundled
documents) with curate, vocab and merge enabled, so that every stage runs: base, curate, vocab, pack, train, merge,
report. One run goes uninterrupted first; its log says when each stage ended, so how long each one takes. Then each
trial starts `graft run` in a fresh runs folder, waits until its target stage begins (the stages take turns), waits
a seeded random part of that stage's length, and sends SIGKILL (to the whole process group: what the OOM killer or a
lost node does) or SIGTERM (what a scheduler sends first, also to every process); then runs `graft run` again to its
end. A SIGTERM must end in exit 143 with one `stopped:` line and no temporary file left; a SIGKILL leaves
temporary files that the rerun removes. The table has one row per trial; the last line counts the trials whose
rerun ended identical to the uninterrupted run (the goal: all of them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
STAGES = ("base", "curate", "vocab", "pack", "train", "merge", "report")

RECIPE = """\
name: kill
base_model: {model}
sources:
  vi: {{paths: ['{data}/vi/viwiki.jsonl'], max_documents: 40, lang: vi}}
  en: {{paths: ['{data}/en/debian_handbook.jsonl'], max_documents: 20, lang: en}}
curate: {{sources: [vi], minhash: {{words: whitespace}}, workers: 1}}
vocab: {{new_tokens: 64}}
mixture: {{vi: 0.75, en: 0.25}}
train: {{seq_len: 32, batch_tokens: 256, max_steps: 16, lr: 1.0e-3, checkpoint_every: 4, keep_checkpoints: 2,
         micro_batch_size: 8}}
eval:
  text: {{vi: '{data}/eval/sib200/vie_Latn/dev.tsv', en: '{data}/eval/sib200/eng_Latn/dev.tsv'}}
  max_documents: 8
  every: 8
merge: {{average_last: 2, alpha: 0.5}}
"""

ENDS = {  # the line each stage ends with (one per source for curate and pack)
    "base": r"base: wrote", "curate": r"curate: \S+: \d+ documents", "vocab": r"vocab: wrote",
    "pack": r"pack: \S+: .* tokens in", "train": r"train: \d+ steps, .* -> ", "merge": r"merge: wrote",
    "report": r"report: ",
}


def make_tiny_model(folder: Path) -> Path:
    """A random 4-block Llama (1.6 M parameters) with the real SmolLM2 tokenizer, as the tests' tiny model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from graftlm.models import load_tokenizer, save_model

    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2-135m")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    save_model(LlamaForCausalLM(config), tokenizer, folder)
    return folder


def write_recipe(folder: Path, model: Path, recipe: str = RECIPE) -> Path:
    path = folder / "kill.yaml"
    path.write_text(recipe.format(model=model, data=DATA))
    return path


class GraftRun:
    """`graft run RECIPE --runs-dir RUNS` in its own process group; its stderr lines are timed as they come."""

    def __init__(self, recipe: Path, runs: Path, ends: dict[str, int]):
        self.ends = ends
        """The stages that run, in order, and how many end lines each has."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "160"}
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "graftlm", "run", str(recipe), "--runs-dir", str(runs)],
                                     cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, errors="replace", start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic() - self.started, line.rstrip("\n")))

    def stage_ends(self) -> dict[str, float]:
        """The time each stage ended at, for those that did."""
        seen: dict[str, list[float]] = {}
        for t, line in list(self.lines):
            for stage, pattern in ENDS.items():
                if re.match(pattern, line.strip()):
                    seen.setdefault(stage, []).append(t)
        return {s: times[-1] for s, times in seen.items() if len(times) >= self.ends[s]}

    def stage_now(self) -> str:
        """The stage running: the first one not ended yet ('start' before the base's first line)."""
        if not any(line.lstrip().startswith("base") for _, line in list(self.lines)):
            return "start"
        ended = self.stage_ends()
        return next((s for s in self.ends if s not in ended), "done")

    def stage_started_at(self, stage: str) -> float | None:
        """When `stage` began: the base's first line, or the end of the stage before it."""
        stages = list(self.ends)
        if stages.index(stage) == 0:
            return next((t for t, line in list(self.lines) if line.lstrip().startswith(stage)), None)
        return self.stage_ends().get(stages[stages.index(stage) - 1])

    def wait(self, timeout: float = 1800) -> tuple[int, str]:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc, "\n".join(line for _, line in self.lines)


def stage_lengths(run: GraftRun) -> dict[str, float]:
    ends = run.stage_ends()
    return {stage: ends[stage] - run.stage_started_at(stage) for stage in run.ends}


def end_lines(sources: int = 2, curated: int = 1) -> dict[str, int]:
    """Every stage of the suite's recipe, in order, with its count of end lines (curate and pack: one a source)."""
    return {stage: {"curate": curated, "pack": sources}.get(stage, 1) for stage in STAGES}


@dataclass
class Outcome:
    """What a finished run directory holds, for comparing runs."""

    weights: dict[str, dict]
    losses: dict[int, float]
    evaluations: list
    leftovers: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, root: Path) -> "Outcome":
        from safetensors.torch import load_file

        weights = {folder: load_file(root / folder / "model.safetensors") for folder in ("model", "merged")
                   if (root / folder / "model.safetensors").is_file()}
        records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines() if line.strip()]
        results = [(r["step"], r.get("model"), {k: v for k, v in r["eval"].items() if k != "seconds"})
                   for r in records if "eval" in r]  # what each part took is a timing, not a result
        return cls(weights, {r["step"]: r["loss"] for r in records if "loss" in r}, results, leftovers(root))

    def same_weights(self, other: "Outcome") -> bool:
        import torch

        return self.weights.keys() == other.weights.keys() and all(
            a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            for a, b in ((self.weights[f], other.weights[f]) for f in self.weights))


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders of an interrupted write (`*.tmp-PID`, `*.old-PID`)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if re.search(r"\.(tmp|old)-\d+$", p.name))


@dataclass
class Trial:
    number: int
    signal: str
    target: str
    delay: float
    at: str = ""
    """The stage running when the signal was sent ('ended' when the run had finished before)."""
    rc: int | None = None
    stop_line: bool = False
    tracebacks: int = 0
    left: int = 0
    """Temporary files left right after the interrupted run."""
    rerun_rc: int | None = None
    resumed: str = ""
    weights: bool = False
    losses: bool = False
    evaluations: bool = False
    left_after: int = 0
    seconds: float = 0.0

    @property
    def identical(self) -> bool:
        return self.rerun_rc == 0 and self.weights and self.losses and self.evaluations and not self.left_after


def reference_run(workdir: Path, recipe: Path) -> tuple[Outcome, dict[str, float], dict[str, int]]:
    """The uninterrupted run: its outcome, each stage's length in seconds, and each stage's count of end lines."""
    ends = end_lines()
    run = GraftRun(recipe, workdir / "reference", ends)
    rc, output = run.wait()
    if rc != 0:
        raise SystemExit(f"the uninterrupted run failed (exit {rc}):\n{output[-3000:]}")
    return Outcome.of(workdir / "reference/kill"), stage_lengths(run), ends


def run_trial(trial: Trial, workdir: Path, recipe: Path, reference: Outcome, lengths: dict[str, float],
              ends: dict[str, int], keep: bool = False) -> Trial:
    started = time.monotonic()
    runs = workdir / f"trial-{trial.number:02d}"
    shutil.rmtree(runs, ignore_errors=True)
    run = GraftRun(recipe, runs, ends)
    while run.proc.poll() is None and run.stage_started_at(trial.target) is None:
        time.sleep(0.02)
    begun = run.stage_started_at(trial.target)
    if begun is not None:
        while run.proc.poll() is None and time.monotonic() - run.started < begun + trial.delay:
            time.sleep(0.01)
    if run.proc.poll() is None:
        trial.at = run.stage_now()
        os.killpg(run.proc.pid, getattr(signal, trial.signal))
    else:
        trial.at = "ended"
    trial.rc, output = run.wait()
    trial.stop_line = sum(line.startswith("stopped:") for line in output.splitlines()) == 1
    trial.left = len(leftovers(runs / "kill")) if (runs / "kill").is_dir() else 0
    rerun = GraftRun(recipe, runs, ends)
    trial.rerun_rc, rerun_output = rerun.wait()
    trial.tracebacks = output.count("Traceback") + rerun_output.count("Traceback")
    found = re.search(r"resuming from (step-\d+)", rerun_output)
    trial.resumed = found.group(1) if found else ""
    if trial.rerun_rc == 0:
        outcome = Outcome.of(runs / "kill")
        trial.weights = outcome.same_weights(reference)
        trial.losses = outcome.losses == reference.losses
        trial.evaluations = outcome.evaluations == reference.evaluations
        trial.left_after = len(outcome.leftovers)
    else:
        print(f"trial {trial.number}: the rerun failed (exit {trial.rerun_rc}):\n{rerun_output[-3000:]}",
              file=sys.stderr)
    trial.seconds = time.monotonic() - started
    if not keep and trial.identical:
        shutil.rmtree(runs, ignore_errors=True)
    return trial


def plan_trials(kills: int, terms: int, seed: int, lengths: dict[str, float]) -> list[Trial]:
    """Signals in a seeded random order; for each kind of signal the target stages take turns (from a random
    first one), so that SIGTERMs too reach as many stages as there are of them; a random point of the target's
    usual length (at most 90% of it: the machine's noise would push more of them into the next stage)."""
    rng = random.Random(seed)
    signals = ["SIGKILL"] * kills + ["SIGTERM"] * terms
    rng.shuffle(signals)
    turns = {name: rng.randrange(len(STAGES)) for name in ("SIGKILL", "SIGTERM")}
    trials = []
    for i, name in enumerate(signals):
        target = STAGES[turns[name] % len(STAGES)]
        turns[name] += 1
        trials.append(Trial(i + 1, name, target, round(rng.uniform(0, 0.9) * max(lengths[target], 0.05), 2)))
    return trials


def table(trials: list[Trial]) -> str:
    head = ("#", "signal", "target", "delay s", "signalled in", "exit", "stopped:", "tmp left", "rerun",
            "resumed from", "weights", "losses", "evals", "tracebacks", "s")
    rows = [(t.number, t.signal, t.target, f"{t.delay:.2f}", t.at, t.rc,
             ("yes" if t.stop_line else "no") if t.signal == "SIGTERM" else "", t.left, t.rerun_rc,
             t.resumed or "-", "same" if t.weights else "DIFF", "same" if t.losses else "DIFF",
             "same" if t.evaluations else "DIFF", t.tracebacks, f"{t.seconds:.0f}") for t in trials]
    widths = [max(len(str(x)) for x in column) for column in zip(head, *rows)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in (head, *rows)]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs (default 20)")
    parser.add_argument("--terms", type=int, default=5, help="SIGTERMs (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed after")
    parser.add_argument("--keep", action="store_true", help="keep every trial's run directory")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="graft-kill-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "tiny-model"
    if not (model / "config.json").is_file():
        make_tiny_model(model)
    recipe = write_recipe(workdir, model)
    started = time.monotonic()
    reference, lengths, ends = reference_run(workdir, recipe)
    print(f"uninterrupted run: {time.monotonic() - started:.0f}s; stage lengths (s): "
          + ", ".join(f"{s} {lengths[s]:.1f}" for s in STAGES), flush=True)
    trials = plan_trials(args.kills, args.terms, args.seed, lengths)
    for trial in trials:
        run_trial(trial, workdir, recipe, reference, lengths, ends, args.keep)
        print(table([trial]).splitlines()[-1], flush=True)
    print()
    print(table(trials))
    identical = sum(t.identical for t in trials)
    sigterms = [t for t in trials if t.signal == "SIGTERM" and t.at not in ("start", "ended")]
    clean = sum(t.rc == 143 and t.stop_line and t.left == 0 for t in sigterms)
    print(f"\n{identical}/{len(trials)} reruns ended identical to the uninterrupted run (weights of model/ and "
          f"merged/, losses, evaluations); {clean}/{len(sigterms)} SIGTERMs during a stage exited 143 with one "
          f"'stopped:' line and no temporary file; tracebacks: {sum(t.tracebacks for t in trials)}; stages "
          f"signalled in: {', '.join(sorted({t.at for t in trials}))}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(0 if identical == len(trials) else 1)


if __name__ == "__main__":
    main()
