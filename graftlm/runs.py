"""The run directory, the user's record of an experiment, and writing into it without leaving half-written files.

    runs/<name>/recipe.yaml      the resolved recipe, every default written out
    runs/<name>/base/            the base model as a plain Hugging Face folder
    runs/<name>/curated/ vocab/ packed/ checkpoints/ model/ adapter/ merged/ compare/
    runs/<name>/corrupt/         checkpoints that failed their verification, moved aside (never deleted)
    runs/<name>/plan/            plan.json, the planned recipe.yaml, report.html; pilots/<pilot>/ run directories
    runs/<name>/metrics.jsonl    one JSON object per logged step or evaluation
    runs/<name>/report.html

A folder named after a recipe value (a source, a compare variant) is built with `RunDir.inside(...)` (or
`inside(root, ...)`), which refuses any path that would leave the run directory. Outputs are written beside their
final name as `<name>.tmp-<pid>` and renamed when complete; the leftovers of a process that died (`*.tmp-<pid>`,
`*.old-<pid>`) are removed the next time something is written beside them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from graftlm.errors import GraftError
from graftlm.progress import log

if TYPE_CHECKING:
    from graftlm.recipe import Recipe


@dataclass(frozen=True)
class RunDir:
    root: Path
    extended_vocab: bool | None = None
    """Whether training starts from the vocabulary-extended model; None: whenever one is there."""

    @classmethod
    def for_recipe(cls, recipe: "Recipe", runs_dir: str | os.PathLike = "runs") -> "RunDir":
        return cls(inside(runs_dir, recipe.name), extended_vocab=recipe.vocab is not None)

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
    corrupt = property(lambda self: self.root / "corrupt")

    def inside(self, *parts: str) -> Path:
        """`root/part/...`, refused (GraftError) when it would not be inside the run directory."""
        return inside(self.root, *parts)

    @property
    def start_model(self) -> Path:
        """The model training starts from: the vocabulary-extended base when the recipe extends the vocabulary
        (a leftover of an earlier recipe that did is ignored), else the base."""
        extended = self.vocab / "model"
        if self.extended_vocab is None:
            return extended if (extended / "config.json").is_file() else self.base
        return extended if self.extended_vocab else self.base

    def write_recipe(self, recipe: "Recipe") -> None:
        """Write recipe.yaml (left untouched when it already says the same, so an up-to-date run writes nothing)."""
        text = recipe.to_yaml()
        if self.recipe.is_file() and self.recipe.read_text(encoding="utf-8") == text:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.recipe, text)

    def append_metrics(self, record: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.metrics, "a+b") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a last line without its newline (a full disk, a kill mid-write)
                    _end_last_line(f, self.metrics)
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every record of metrics.jsonl. A torn last line (what a full disk or a kill mid-write leaves) is skipped
        with a warning; a bad line before the last one is an error naming it."""
        if not self.metrics.is_file():
            return []
        with open(self.metrics, "rb") as f:
            lines = f.read().split(b"\n")
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if any(rest.strip() for rest in lines[number:]):
                    raise GraftError(f"{self.metrics}:{number}: not a metrics record ({e}); the file is damaged "
                                     f"before its last line") from None
                log(f"warning: {self.metrics}:{number}: a torn last line ({len(line)} bytes), skipped")
                break
            records.append(record)
        return records

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        write_text_atomic(self.metrics, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    def training_summary(self) -> dict[str, Any]:
        """The trained model's record (`train_marker`), or {} before training finished."""
        return read_json(self.train_marker) if self.train_marker.is_file() else {}

    @property
    def final_model(self) -> Path:
        """The model the run hands over: the merged one when the merge stage ran, else the trained one."""
        return self.merged if (self.merged / "config.json").is_file() else self.model


def _end_last_line(f, path: Path) -> None:
    """An open (binary, appending) file whose last line lacks its newline: end the line when it is a whole record,
    else cut it off (a torn write), so that the next record starts a line of its own."""
    f.seek(0)
    data = f.read()
    keep = data.rfind(b"\n") + 1
    try:
        json.loads(data[keep:])
        f.write(b"\n")
    except ValueError:
        log(f"warning: {path}: dropped a torn last line ({len(data) - keep} bytes)")
        f.truncate(keep)


def inside(root: str | os.PathLike, *parts: str) -> Path:
    """`root/part/...`, where each part must be one plain path component (not empty, `.` or `..`, no separator), so
    the path stays in `root`. Recipe values are checked as plain names when the recipe loads; this is the second
    fence, where the path is built."""
    for part in parts:
        part = str(part)
        if part in ("", ".", "..") or "/" in part or (os.altsep and os.altsep in part) or os.sep in part \
                or "\0" in part:
            raise GraftError(f"{part!r}: not a plain name, so {Path(root).joinpath(*map(str, parts))} could be "
                             f"outside {root}; names in a recipe must be letters, digits, '.', '_' or '-'")
    return Path(root).joinpath(*map(str, parts))


_LEFTOVER = re.compile(r"^(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (a different user's counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the `*.tmp-<pid>` / `*.old-<pid>` leftovers of dead processes directly in `folder`; returns them.

    An `.old-` folder whose final name is missing is the previous complete output of a process killed between its
    two renames: it is put back rather than removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if not match or pid_alive(int(match.group("pid"))):
            continue
        final = folder / match.group("name")
        if match.group("kind") == "old" and not final.exists():
            with contextlib.suppress(OSError):
                entry.rename(final)
                continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def remove_stale_tree(root: str | os.PathLike, depth: int = 3) -> list[Path]:
    """`remove_stale` in `root` and its folders down to `depth` levels (a run directory: runs/<name>/packed/...)."""
    root = Path(root)
    removed = remove_stale(root)
    if depth > 0 and root.is_dir():
        for child in sorted(root.iterdir()):
            if child.is_dir() and not child.is_symlink():
                removed += remove_stale_tree(child, depth - 1)
    return removed


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final`, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:  # a read-only or full disk: name the output, not its temporary name
        raise _naming(e, final) from None
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (e.filename is None or str(e.filename).startswith(str(tmp))):
            raise _naming(e, final) from None  # a write error says no file, or the temporary one: name the output
        raise
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str, clean: bool = True) -> None:
    """`clean=False` for a reader of a run (`graft report`), which leaves what is beside the file alone: on a shared
    file system a writer's temporary files may belong to a process of another machine, alive."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if clean:
        remove_stale(path.parent)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.filename in (None, str(tmp)):  # name the file, not its temporary name
            raise _naming(e, path) from None
        raise


def _naming(e: OSError, path: str | os.PathLike) -> OSError:
    """The same OSError, naming `path` (keeping what it carries, such as the bytes a full disk needed)."""
    named = OSError(e.errno, e.strerror or str(e), str(path))
    named.__dict__.update(getattr(e, "__dict__", {}))
    return named


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


def disk_full(path: str | os.PathLike, needed: int | None = None) -> OSError:
    """The OSError of a full disk, with the bytes that were needed (the CLI prints them beside the free space)."""
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    error.needed_bytes = needed  # type: ignore[attr-defined]
    return error


@contextlib.contextmanager
def disk_full_as_oserror(path: str | os.PathLike, needed: int | None = None) -> Iterator[None]:
    """torch.save reports a full disk as RuntimeError ("unexpected pos ..."), safetensors as SafetensorError ("No
    space left on device (os error 28)"): make it the OSError it is, naming `path`, so the CLI says it in one line."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, needed) from None
        raise
    except Exception as e:
        said = "No space left on device" in str(e) or "os error 28" in str(e)
        inferred = isinstance(e, RuntimeError) and needed is not None and \
            shutil.disk_usage(Path(path).parent).free < needed
        if said or inferred:
            raise disk_full(path, needed) from None
        raise


# ---- one writer per run --------------------------------------------------------------------------------------------

LOCK_NAME = ".lock"


class RunLocked(GraftError):
    """Another command is writing into the run directory (exit 2)."""


_held: dict[Path, list] = {}
"""The run locks this process holds: lock file -> [file descriptor, depth] (a command that writes into a run calls
others that take the same lock: compare runs the stages of the recipe and of each variant)."""


@contextlib.contextmanager
def hold_run(root: str | os.PathLike) -> Iterator[None]:
    """Be the one writer of the run directory `root` for as long as the block runs; a second one is refused.

    The lock is `fcntl.flock` on runs/<name>/.lock, so the operating system releases it when the process ends, killed
    or not: the lock of a dead process is simply taken. The file says who holds it (PID, host, command, since when)
    for the refusal's message; it is never deleted (a lock file removed while another process opened it would let
    two processes hold two locks). A process started by `fork` keeps the lock while it lives (a curation worker still
    writing). Under `accelerate launch` only the main process (RANK 0) takes it, for the whole job; the other
    processes write nothing of the run themselves. Re-entrant within a process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0":
        yield
        return
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = (root / LOCK_NAME).resolve()
    if path in _held:
        _held[path][1] += 1
        try:
            yield
        finally:
            _held[path][1] -= 1
        return
    fd = _take_lock(root, path)
    if fd is None:  # a file system without locks: said once, the command runs unguarded
        yield
        return
    _held[path] = [fd, 1]
    try:
        yield
    finally:
        del _held[path]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no holder: what the file says stays true
        os.close(fd)  # releases the lock


def _take_lock(root: Path, path: Path) -> int | None:
    import fcntl
    import socket
    import sys
    import time

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise RunLocked(f"{root}: another graft command is writing into this run ({_describe_holder(holder)}); "
                        f"wait for it to end or stop it, or give this run another name") from None
    except OSError as e:
        os.close(fd)
        log(f"warning: {path}: this file system does not lock files ({e.strerror}); nothing stops a second command "
            f"from writing into this run at the same time")
        return None
    previous = _lock_holder(fd)
    if previous:  # its holder ended without releasing it: killed, or its machine went down
        log(f"{root}: the lock of {_describe_holder(previous, held=False)} was left behind; taken over")
    command = " ".join(["graft" if os.path.basename(sys.argv[0]) in ("__main__.py", "graft") else sys.argv[0],
                        *sys.argv[1:]])
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"), 0)
    return fd


def _lock_holder(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # a holder killed while it wrote the file
        return {}
    return record if isinstance(record, dict) else {}


def _describe_holder(holder: dict, held: bool = True) -> str:
    import socket

    if not holder:
        return "a process that did not say who it is"
    pid, host = holder.get("pid"), holder.get("host")
    said = f"PID {pid} on {host}, `{holder.get('command', '?')}`, since {holder.get('since', '?')}"
    if held and host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
        said += "; that process ended, a process it started still holds the lock"
    return said
