"""Checks of model files that take milliseconds and load nothing: a weights file cut short or damaged is one line
that names it, and the model's context length is known before any work.

    check_safetensors(path)    the header parses and the file is exactly as long as the header says
    read_gguf_header(path)     the metadata and tensor table of a .gguf file, checked against the file's length
    config_positions(config)   the positions a Hugging Face config.json allows (max_position_embeddings, ...)

A file that fails is a `GraftError` whose message starts with its path.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from graftlm.errors import GraftError

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
"""The config.json keys in which model families state their context length."""


def check_safetensors(path: str | os.PathLike) -> None:
    """A .safetensors file is an 8-byte header length, a JSON header and the tensors' bytes; a file cut short, empty
    or overwritten does not add up."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            if size < 8:
                raise ValueError(f"{size} bytes, shorter than a safetensors header")
            (header_size,) = struct.unpack("<Q", f.read(8))
            if header_size > size - 8:
                raise ValueError(f"cut short: its header alone needs {header_size + 8:,} bytes, the file has {size:,}")
            header = json.loads(f.read(header_size))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        expected = 8 + header_size + max(ends, default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise GraftError(f"{path}: not a valid safetensors file ({e})") from None
    if size != expected:
        raise GraftError(f"{path}: not a valid safetensors file: it has {size:,} bytes, its header says {expected:,}"
                         + (" (cut short)" if size < expected else ""))


# ---- GGUF ------------------------------------------------------------------------------------------------------

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFHeader:
    metadata: dict[str, Any] = field(default_factory=dict)
    """Every scalar and string value; arrays (the vocabulary) are skipped."""
    tensors: int = 0
    data_bytes: int = 0
    """Where the tensor data must end: the file is at least this long."""

    @property
    def context_length(self) -> int | None:
        arch = self.metadata.get("general.architecture")
        value = self.metadata.get(f"{arch}.context_length")
        return int(value) if isinstance(value, int) else None


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse a .gguf file's header (metadata and tensor table, a few ms on a 100 MB file); a header cut short or a
    tensor table that points past the end of the file is a GraftError naming the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = os.path.getsize(path)
    if size == 0:
        raise GraftError(f"{path}: not a valid GGUF file (it is empty)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        reader = _Reader(data)
        try:
            if data[:4] != b"GGUF":
                raise ValueError("it does not start with the GGUF magic bytes")
            reader.pos = 4
            version, tensors, kv_count = reader.unpack("<IQQ")
            if version not in (2, 3):
                raise ValueError(f"unsupported GGUF version {version}")
            header = GGUFHeader(tensors=tensors)
            for _ in range(kv_count):
                key = reader.string()
                (kind,) = reader.unpack("<I")
                value = reader.value(kind)
                if value is not _Reader.SKIPPED:
                    header.metadata[key] = value
            end = 0
            for _ in range(tensors):
                reader.string()
                (dims,) = reader.unpack("<I")
                shape = reader.unpack(f"<{dims}Q")
                kind, offset = reader.unpack("<IQ")
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
                except (ValueError, KeyError):  # a type newer than the gguf package: its size is not checked
                    continue
                elements = 1
                for n in shape:
                    elements *= n
                end = max(end, offset + elements // block * type_size)
            alignment = header.metadata.get("general.alignment", 32)
            if not isinstance(alignment, int) or alignment <= 0:
                raise ValueError(f"bad general.alignment {alignment!r}")
            start = -(-reader.pos // alignment) * alignment
            header.data_bytes = start + end
        except (ValueError, KeyError, struct.error, OverflowError, MemoryError) as e:
            why = "the file ends inside it" if isinstance(e, struct.error) else str(e)
            raise GraftError(f"{path}: not a valid GGUF file: its header is damaged or cut short at byte "
                             f"{reader.pos:,} of {size:,} ({why})") from None
    if header.data_bytes > size:
        raise GraftError(f"{path}: not a valid GGUF file: cut short, its tensors need {header.data_bytes:,} bytes, the "
                         f"file has {size:,}")
    return header


class _Reader:
    SKIPPED = object()

    def __init__(self, data: mmap.mmap):
        self.data, self.pos = data, 0

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        if self.pos + length > len(self.data):
            raise ValueError(f"a string of {length:,} bytes runs past the end")
        text = self.data[self.pos:self.pos + length].decode("utf-8")
        self.pos += length
        return text

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack("<" + _SCALARS[kind])[0]
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<IQ")
            if item in _SCALARS:  # skipped in one jump
                self.pos += struct.calcsize(_SCALARS[item]) * count
                if self.pos > len(self.data):
                    raise ValueError("an array runs past the end")
            elif item == _STRING:  # the vocabulary: ~100k strings, skipped without decoding them
                pos, data, unpack = self.pos, self.data, struct.unpack_from
                for _ in range(count):
                    pos += 8 + unpack("<Q", data, pos)[0]
                if pos > len(data):
                    raise ValueError("an array runs past the end")
                self.pos = pos
            else:
                for _ in range(count):
                    self.value(item)
            return self.SKIPPED
        raise ValueError(f"unknown value type {kind}")


# ---- context length ---------------------------------------------------------------------------------------------


def config_positions(config: dict) -> int | None:
    """The positions a Hugging Face config allows (its text model's, for a multimodal one), or None if it says none."""
    for node in (config, config.get("text_config") or {}):
        for key in POSITION_KEYS:
            if isinstance(node.get(key), int) and not isinstance(node.get(key), bool):
                return node[key]
    return None
