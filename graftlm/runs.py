"""The run directory, the user's record of an experiment, and writing into it without leaving half-written files.

    runs/<name>/recipe.yaml      the resolved recipe, every default written out
    runs/<name>/base/            the base model as a plain Hugging Face folder
    runs/<name>/curated/ vocab/ packed/ checkpoints/ model/ adapter/ merged/ compare/
    runs/<name>/plan/            plan.json, the planned recipe.yaml, report.html; pilots/<pilot>/ run directories
    runs/<name>/metrics.jsonl    one JSON object per logged step or evaluation
    runs/<name>/report.html
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from graftlm.recipe import Recipe


@dataclass(frozen=True)
class RunDir:
    root: Path
    extended_vocab: bool | None = None
    """Whether training starts from the vocabulary-extended model; None: whenever one is there."""

    @classmethod
    def for_recipe(cls, recipe: "Recipe", runs_dir: str | os.PathLike = "runs") -> "RunDir":
        return cls(Path(runs_dir) / recipe.name, extended_vocab=recipe.vocab is not None)

    recipe = property(lambda self: self.root / "recipe.yaml")
    base = property(lambda self: self.root / "base")
    curated = property(lambda self: self.root / "curated")
    vocab = property(lambda self: self.root / "vocab")
    packed = property(lambda self: self.root / "packed")
    checkpoints = property(lambda self: self.root / "checkpoints")
    model = property(lambda self: self.root / "model")
    adapter = property(lambda self: self.root / "adapter")
    merged = property(lambda self: self.root / "merged")
    plan = property(lambda self: self.root / "plan")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    report = property(lambda self: self.root / "report.html")
    timings = property(lambda self: self.root / "timings.json")
    trackers = property(lambda self: self.root / "trackers")
    base_marker = property(lambda self: self.base / "graft-base.json")
    train_marker = property(lambda self: self.model / "graft-train.json")
    """What training wrote last: steps, tokens, seconds, tokens per source (the report and compare read it)."""
    merge_marker = property(lambda self: self.merged / "graft-merge.json")

    @property
    def start_model(self) -> Path:
        """The model training starts from: the vocabulary-extended base when the recipe extends the vocabulary
        (a leftover of an earlier recipe that did is ignored), else the base."""
        extended = self.vocab / "model"
        if self.extended_vocab is None:
            return extended if (extended / "config.json").is_file() else self.base
        return extended if self.extended_vocab else self.base

    def write_recipe(self, recipe: "Recipe") -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.recipe, recipe.to_yaml())

    def append_metrics(self, record: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        with open(self.metrics, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        write_text_atomic(self.metrics, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    def training_summary(self) -> dict[str, Any]:
        """The trained model's record (`train_marker`), or {} before training finished."""
        return read_json(self.train_marker) if self.train_marker.is_file() else {}

    @property
    def final_model(self) -> Path:
        """The model the run hands over: the merged one when the merge stage ran, else the trained one."""
        return self.merged if (self.merged / "config.json").is_file() else self.model


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final`, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts: what a stage's output depends on, to skip work already done."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def flatten(tree: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """A nested mapping as one level of `a.b.c` keys (lists and other values are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{sep}{key}" if prefix else str(key), sep))
    return flat


def file_signature(path: str | os.PathLike) -> list:
    """Cheap identity of an input file (path, size, modification time) for fingerprints."""
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def hash_files(paths: list[Path]) -> str:
    """Content hash of files (used for the tokenizer: same files, same token ids)."""
    h = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
