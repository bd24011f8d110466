"""Tokenise each source and pack it into memory-mapped token shards.

    runs/<name>/packed/<source>/shard-00000.bin   raw token ids (uint16 when the vocabulary fits, else uint32)
    runs/<name>/packed/<source>/manifest.json     tokens, documents, bytes, shards, tokenizer hash, ...

Documents are tokenised without special tokens and each is followed by EOS. A reader thread parses the files
while the tokenizer (Rust, all cores, GIL released) encodes the previous batch, so both cores stay busy. The same
inputs and tokenizer give byte-identical shards; unchanged inputs skip the work.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from graftlm.data.config import PackConfig, SourceConfig
from graftlm.data.read import ReadStats, read_documents, resolve_paths, text_bytes
from graftlm.errors import DataError
from graftlm.models import tokenizer_files
from graftlm.progress import bytes_progress, log
from graftlm.runs import RunDir, atomic_dir, file_signature, fingerprint, hash_files, read_json, write_json_atomic

PACK_FORMAT = 1


@dataclass(frozen=True)
class Shard:
    path: Path
    tokens: int


@dataclass(frozen=True)
class PackedSource:
    """A packed source as later stages see it: its manifest and its shards, opened as memory maps on demand."""

    folder: Path
    manifest: dict

    @classmethod
    def open(cls, folder: str | Path) -> "PackedSource":
        folder = Path(folder)
        return cls(folder, read_json(folder / "manifest.json"))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def tokens(self) -> int:
        return self.manifest["tokens"]

    def shards(self) -> list[Shard]:
        return [Shard(self.folder / s["file"], s["tokens"]) for s in self.manifest["shards"]]

    def memmaps(self) -> list[np.memmap]:
        return [np.memmap(s.path, dtype=self.dtype, mode="r", shape=(s.tokens,)) for s in self.shards()]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def load_fast_tokenizer(folder: str | Path):
    """The run's tokenizer as transformers loads it; packing uses its Rust backend directly."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"{folder}: packing needs a fast (Rust) tokenizer (tokenizer.json)")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{folder}: the tokenizer has no EOS token to separate documents")
    return tokenizer


def pack_source(name: str, source: SourceConfig, tokenizer_dir: str | Path, out_dir: str | Path,
                config: PackConfig = PackConfig()) -> dict:
    """Pack one source into `out_dir` unless the manifest there says the same inputs were packed already."""
    out_dir = Path(out_dir)
    tok_hash = hash_files(tokenizer_files(tokenizer_dir))
    files = resolve_paths(source, name)
    key = fingerprint(PACK_FORMAT, source.model_dump(mode="json"), [file_signature(f) for f in files], tok_hash,
                      config.model_dump(mode="json"))
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file() and read_json(manifest_path).get("fingerprint") == key:
        log(f"pack: {name} is up to date ({out_dir})")
        return read_json(manifest_path)

    tokenizer = load_fast_tokenizer(tokenizer_dir)
    backend, eos = tokenizer.backend_tokenizer, tokenizer.eos_token_id
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    dtype = token_dtype(len(tokenizer))
    stats = ReadStats()
    total_bytes = text_bytes(files)
    started = time.perf_counter()
    with atomic_dir(out_dir) as tmp, ShardWriter(tmp, dtype, config.shard_tokens) as writer, \
            bytes_progress() as progress:
        task = progress.add_task(f"pack {name}", total=total_bytes)
        for batch, batch_bytes in _batches_in_background(read_documents(source, name, stats), config.batch_bytes):
            encodings = encode(batch, add_special_tokens=False)
            writer.write(_join_with_eos([e.ids for e in encodings], eos, dtype))
            progress.advance(task, batch_bytes)
        progress.update(task, total=total_bytes or stats.bytes, completed=total_bytes or stats.bytes)
        if stats.documents == 0:
            raise DataError(f"sources.{name}: no documents to pack")
        seconds = time.perf_counter() - started
        manifest = {
            "source": name, "tokens": writer.tokens, "documents": stats.documents, "bytes": stats.bytes,
            "shards": writer.shards, "tokenizer": tok_hash, "dtype": dtype.name, "eos_token_id": eos,
            "vocab_size": len(tokenizer), "fingerprint": key, "read": stats.as_dict(),
            "seconds": round(seconds, 3), "mb_per_s": round(stats.bytes / 1e6 / max(seconds, 1e-9), 3),
        }
        write_json_atomic(tmp / "manifest.json", manifest)
    log(f"pack: {name}: {stats.documents:,} documents, {stats.bytes / 1e6:.1f} MB -> {writer.tokens:,} tokens "
        f"in {seconds:.1f}s ({manifest['mb_per_s']:.2f} MB/s)")
    return manifest


def pack_all(recipe, run: RunDir) -> dict[str, dict]:
    """The `pack` stage: every source of the recipe (its curated text when curation ran) with the run's tokenizer."""
    return {name: pack_source(name, training_source(run, name, source), run.start_model, run.inside("packed", name),
                              recipe.pack)
            for name, source in recipe.sources.items()}


def training_source(run: RunDir, name: str, source: SourceConfig) -> SourceConfig:
    """What training reads for a source: the curated documents when curation finished for it, else the raw ones."""
    curated = run.inside("curated", name)
    if (curated / "stats.json").is_file():
        return SourceConfig(paths=[str(curated / "*.jsonl.gz")], format="jsonl", text_field="text",
                            lang=source.lang)
    return source


def _join_with_eos(ids: list[list[int]], eos: int, dtype: np.dtype) -> np.ndarray:
    out = np.empty(sum(len(x) for x in ids) + len(ids), dtype=dtype)
    pos = 0
    for doc in ids:
        out[pos:pos + len(doc)] = doc
        pos += len(doc)
        out[pos] = eos
        pos += 1
    return out


def _batches_in_background(docs: Iterator[str], batch_bytes: int) -> Iterator[tuple[list[str], int]]:
    """Group documents into batches of about `batch_bytes`, read in a thread so that parsing overlaps encoding.
    Errors in the reader are re-raised here, in order."""
    batches: queue.Queue = queue.Queue(maxsize=4)
    done = object()

    def produce() -> None:
        try:
            batch, size = [], 0
            for doc in docs:
                batch.append(doc)
                size += len(doc.encode("utf-8"))
                if size >= batch_bytes:
                    batches.put((batch, size))
                    batch, size = [], 0
            if batch:
                batches.put((batch, size))
            batches.put(done)
        except BaseException as e:  # handed to the consumer, which raises it
            batches.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    while (item := batches.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
    thread.join()


class ShardWriter:
    """Appends token arrays to fixed-size shard files."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int):
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.shards: list[dict] = []
        self.tokens = 0
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            self._file.write(part.tobytes())
            self.shards[-1]["tokens"] += len(part)
            self.tokens += len(part)

    def _open_next(self) -> None:
        self.close()
        name = f"shard-{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
