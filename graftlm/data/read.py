"""Streaming documents out of .jsonl, .txt, .tsv and .parquet files, plain or compressed (.gz, .zst).

Memory stays flat whatever the corpus size: files are read a line (or a parquet batch) at a time. A bad record
stops the stage with `file:line: what is wrong`, or, with `on_error: skip`, is skipped and counted. A compressed
file must end where its last gzip member or zstd frame ends: one cut short is a bad record too ("cannot read"),
never a silently shorter corpus.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator, NamedTuple

import zstandard

from graftlm.data.config import SourceConfig
from graftlm.errors import DataError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "txt", ".text": "txt", ".md": "txt",
           ".tsv": "tsv", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".zst")


class Record(NamedTuple):
    text: str
    path: str
    line: int  # 1-based line (row for parquet) where the document starts


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    empty: int = 0
    skipped: Counter = field(default_factory=Counter)
    """Bad records skipped under `on_error: skip`, by reason."""
    first_skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"files": self.files, "documents": self.documents, "bytes": self.bytes, "empty": self.empty,
                "skipped": dict(self.skipped), "first_skipped": self.first_skipped}


OnBad = Callable[[str, str], None]  # (message, reason) -> None, or raises DataError


def text_bytes(files: list[str]) -> int | None:
    """The bytes of text in `files` (for progress bars), or None when one is compressed: its text size is unknown
    until it is read."""
    if any(f.endswith(COMPRESSIONS) for f in files):
        return None
    return sum(os.path.getsize(f) for f in files)


def resolve_paths(source: SourceConfig, name: str = "") -> list[str]:
    """The files a source names, in a stable order; a missing file or an empty glob is an error."""
    files: list[str] = []
    where = f" (sources.{name}.paths)" if name else ""
    for pattern in source.paths:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"{pattern}: glob matches no file{where}")
            files.extend(matches)
        elif os.path.isdir(pattern):
            raise DataError(f"{pattern}: is a folder; name its files with a glob such as {pattern}/*.jsonl{where}")
        elif not os.path.exists(pattern):
            raise DataError(f"{pattern}: no such file{where}")
        else:
            files.append(pattern)
    return files


def read_documents(source: SourceConfig, name: str = "", stats: ReadStats | None = None) -> Iterator[str]:
    for record in read_records(source, name, stats):
        yield record.text


def read_records(source: SourceConfig, name: str = "", stats: ReadStats | None = None) -> Iterator[Record]:
    """Every non-empty document of a source, in file order, with where it came from."""
    stats = stats if stats is not None else ReadStats()

    def on_bad(message: str, reason: str) -> None:
        if source.on_error == "stop":
            raise DataError(message)
        stats.skipped[reason] += 1
        if len(stats.first_skipped) < 10:
            stats.first_skipped.append(message)

    for path in resolve_paths(source, name):
        stats.files += 1
        for record in _read_file(path, source, on_bad):
            if not record.text.strip():
                stats.empty += 1
                continue
            stats.documents += 1
            stats.bytes += len(record.text.encode("utf-8"))
            yield record
            if source.max_documents is not None and stats.documents >= source.max_documents:
                return


def file_format(path: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    stem = path[: -len(ext)] if (ext := os.path.splitext(path)[1]) in COMPRESSIONS else path
    suffix = os.path.splitext(stem)[1].lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unknown file type '{suffix}'; name one with the source's `format:` "
                        f"({', '.join(sorted(set(FORMATS.values())))})")
    return FORMATS[suffix]


def _read_file(path: str, source: SourceConfig, on_bad: OnBad) -> Iterator[Record]:
    fmt = file_format(path, source.format)
    if fmt == "parquet":
        yield from _read_parquet(path, source.text_field, on_bad)
        return
    reader = {"jsonl": _read_jsonl, "tsv": _read_tsv, "txt": _read_txt}[fmt]
    lines = _Lines(path, on_bad)
    try:
        yield from reader(lines, source, on_bad)
    except UNREADABLE as e:  # a truncated or corrupt compressed stream, a read error
        lines.failed = True
        on_bad(f"{path}:{lines.number + 1}: cannot read: {_reason(e)}", "unreadable file")
    finally:
        lines.close()
    if lines.number == 0 and not lines.failed:
        on_bad(f"{path}: empty file", "empty file")


UNREADABLE = (OSError, EOFError, zlib.error, zstandard.ZstdError)
"""What reading a damaged file raises: gzip raises EOFError (cut short), OSError (not gzip) or zlib.error (corrupt)."""


def _reason(e: BaseException) -> str:
    """An exception's message on one line (pyarrow's span several)."""
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


class _Lines:
    """The decoded lines of a text file with their 1-based numbers; bytes that are not UTF-8 are reported."""

    def __init__(self, path: str, on_bad: OnBad):
        self.path, self.on_bad = path, on_bad
        self.number = 0
        self.failed = False
        try:
            self._file: BinaryIO | None = _open_binary(path)
        except OSError as e:
            self._file, self.failed = None, True
            on_bad(f"{path}: cannot open: {e.strerror or e}", "unreadable file")

    def __iter__(self) -> Iterator[tuple[int, str]]:
        if self._file is None:
            return
        for raw in self._file:
            self.number += 1
            if self.number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark (some Windows editors)
                raw = raw[3:]
            try:
                yield self.number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self.on_bad(f"{self.path}:{self.number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                            f"{e.start + 1})", "not UTF-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _open_binary(path: str) -> BinaryIO:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]  # raises EOFError when cut short
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdStream(path), buffer_size=1 << 16)  # type: ignore[return-value]
    return open(path, "rb")


class _ZstdStream(io.RawIOBase):
    """The decompressed bytes of a .zst file, one frame after another. python-zstandard's own stream reader ends
    quietly where a cut file ends; this one raises EOFError when the file ends inside a frame."""

    def __init__(self, path: str):
        self._file = open(path, "rb")
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._out):
            chunk = self._file.read(1 << 17)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame (it was cut short)")
                return 0
            self._out, self._pos = self._decompress(chunk), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = memoryview(self._out)[self._pos:self._pos + n]
        self._pos += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            out.append(self._frame.decompress(data))
            self._in_frame = True
            if not self._frame.eof:
                break
            data = self._frame.unused_data  # the next frame (zstd files may hold several)
            self._frame, self._in_frame = self._decompressor.decompressobj(), False
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def read_json_objects(path: str) -> Iterator[tuple[int, dict]]:
    """Every object of a .jsonl file (plain or compressed) with its line number; anything else is a DataError."""

    def stop(message: str, reason: str) -> None:
        raise DataError(message)

    lines = _Lines(path, stop)
    try:
        yield from _json_objects(lines, stop)
    except UNREADABLE as e:
        raise DataError(f"{path}:{lines.number + 1}: cannot read: {_reason(e)}") from None
    finally:
        lines.close()
    if lines.number == 0:
        raise DataError(f"{path}: empty file")


def _json_objects(lines: _Lines, on_bad: OnBad) -> Iterator[tuple[int, dict]]:
    for number, line in lines:
        if not line.strip():
            continue
        where = f"{lines.path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            on_bad(f"{where}: invalid JSON: {e.msg} (column {e.colno})", "invalid JSON")
            continue
        if not isinstance(obj, dict):
            on_bad(f"{where}: expected a JSON object, got {type(obj).__name__}", "not an object")
            continue
        yield number, obj


def _read_jsonl(lines: _Lines, source: SourceConfig, on_bad: OnBad) -> Iterator[Record]:
    key = source.text_field
    for number, obj in _json_objects(lines, on_bad):
        where = f"{lines.path}:{number}"
        if key not in obj:
            on_bad(f"{where}: no field '{key}' (fields: {', '.join(obj) or 'none'})", "missing field")
        elif not isinstance(obj[key], str):
            on_bad(f"{where}: field '{key}' is {type(obj[key]).__name__}, expected a string", "field not text")
        else:
            yield Record(obj[key], lines.path, number)


def _read_tsv(lines: _Lines, source: SourceConfig, on_bad: OnBad) -> Iterator[Record]:
    column = None
    width = 0
    for number, line in lines:
        cells = line.rstrip("\r\n").split("\t")
        if column is None:
            if source.text_field not in cells:
                on_bad(f"{lines.path}:{number}: no column '{source.text_field}' in the header "
                       f"(columns: {', '.join(cells)})", "missing column")
                return
            column, width = cells.index(source.text_field), len(cells)
        elif not line.strip():
            continue
        elif len(cells) != width:
            on_bad(f"{lines.path}:{number}: expected {width} tab-separated columns, got {len(cells)}", "bad row")
        else:
            yield Record(cells[column], lines.path, number)


def _read_txt(lines: _Lines, source: SourceConfig, on_bad: OnBad) -> Iterator[Record]:
    mode = source.txt_documents
    if mode == "line":
        for number, line in lines:
            yield Record(line.rstrip("\r\n"), lines.path, number)
        return
    paragraph: list[str] = []
    start = 1
    for number, line in lines:
        if mode == "paragraph" and not line.strip():
            if paragraph:
                yield Record("".join(paragraph).rstrip("\r\n"), lines.path, start)
            paragraph = []
            continue
        if not paragraph:
            start = number
        paragraph.append(line)
    if paragraph:
        text = "".join(paragraph)
        yield Record(text.rstrip("\r\n") if mode == "paragraph" else text, lines.path, start)


def _read_parquet(path: str, key: str, on_bad: OnBad) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        on_bad(f"{path}: not a readable parquet file: {_reason(e)}", "unreadable file")
        return
    columns = parquet.schema_arrow.names
    if key not in columns:
        on_bad(f"{path}: no column '{key}' (columns: {', '.join(columns)})", "missing column")
        return
    if parquet.metadata.num_rows == 0:
        on_bad(f"{path}: empty file", "empty file")
        return
    row = 0
    batches = parquet.iter_batches(batch_size=1024, columns=[key])
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a damaged page: pyarrow raises ArrowInvalid, OSError and others
            on_bad(f"{path}:{row + 1}: cannot read: {_reason(e)}", "unreadable file")
            return
        if batch is None:
            return
        for value in _column_values(batch.column(0)):
            row += 1
            if value is _NOT_UTF8:
                on_bad(f"{path}:{row}: column '{key}' is not valid UTF-8", "not UTF-8")
            elif not isinstance(value, str):
                on_bad(f"{path}:{row}: column '{key}' is {type(value).__name__}, expected a string", "field not text")
            else:
                yield Record(value, path, row)


_NOT_UTF8 = object()


def _column_values(column) -> list:
    """A parquet column's values; a string that is not valid UTF-8 (a damaged page) becomes `_NOT_UTF8`."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        values = []
        for i in range(len(column)):
            try:
                values.append(column[i].as_py())
            except UnicodeDecodeError:
                values.append(_NOT_UTF8)
        return values
