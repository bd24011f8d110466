"""The training mixture: fixed-length sequences drawn from several packed sources in set proportions.

Each source's token stream is cut into windows of `seq_len + 1` tokens (inputs and next-token targets). A source
serves its windows in a shuffled order, one epoch after another, each epoch shuffled anew from `(seed, source,
epoch)`. Which source serves the next sequence is decided by smooth weighted round-robin, so that after any
number of sequences each source has served its share to within one sequence — deterministic, no random state.

The sampler's whole state is a small JSON-able dict (`state()` / `load_state()`), saved in every checkpoint, so a
resumed run draws exactly the sequences the interrupted one would have drawn.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from graftlm.data.pack import PackedSource
from graftlm.errors import DataError


class MixtureExhausted(Exception):
    """A source ran out of data and the mixture says `repeat: false`."""


@dataclass
class _SourceStream:
    name: str
    shards: list[np.memmap]
    window: int
    seed: int
    windows_per_shard: list[int] = field(init=False)
    epoch: int = 0
    position: int = 0
    order: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.windows_per_shard = [len(s) // self.window for s in self.shards]
        if self.windows == 0:
            raise DataError(f"sources.{self.name}: {sum(len(s) for s in self.shards):,} packed tokens, fewer than one "
                            f"training sequence (train.seq_len + 1 = {self.window:,}); add text or lower "
                            f"train.seq_len")
        self._shuffle()

    @property
    def windows(self) -> int:
        return sum(self.windows_per_shard)

    def _shuffle(self) -> None:
        rng = np.random.default_rng([self.seed, zlib.crc32(self.name.encode()), self.epoch])
        self.order = rng.permutation(self.windows)

    def next_window(self, repeat: bool) -> np.ndarray:
        if self.position == self.windows:
            if not repeat:
                raise MixtureExhausted(self.name)
            self.epoch += 1
            self.position = 0
            self._shuffle()
        index = int(self.order[self.position])
        self.position += 1
        for shard, count in zip(self.shards, self.windows_per_shard):
            if index < count:
                return np.asarray(shard[index * self.window:(index + 1) * self.window], dtype=np.int64)
            index -= count
        raise AssertionError("window index out of range")


class MixtureSampler:
    """Draws sequences of `seq_len + 1` tokens from packed sources in proportion to their weights."""

    def __init__(self, sources: dict[str, PackedSource], weights: dict[str, float], seq_len: int, seed: int,
                 repeat: bool = True):
        active = {name: w for name, w in weights.items() if w > 0}
        self.names = list(active)
        total = sum(active.values())
        self.shares = np.array([active[n] / total for n in self.names])
        self.repeat = repeat
        self.streams = {n: _SourceStream(n, sources[n].memmaps(), seq_len + 1, seed) for n in self.names}
        self.credit = np.zeros(len(self.names))
        self.sequences = {n: 0 for n in self.names}

    def next_sequence(self) -> tuple[str, np.ndarray]:
        self.credit += self.shares
        pick = int(np.argmax(self.credit))  # ties go to the first source: deterministic
        self.credit[pick] -= 1.0
        name = self.names[pick]
        window = self.streams[name].next_window(self.repeat)
        self.sequences[name] += 1
        return name, window

    def next_batch(self, count: int) -> tuple[np.ndarray, list[str]]:
        names, windows = zip(*(self.next_sequence() for _ in range(count)))
        return np.stack(windows), list(names)

    def tokens_by_source(self, seq_len: int) -> dict[str, int]:
        return {n: c * seq_len for n, c in self.sequences.items()}

    def epochs(self) -> dict[str, int]:
        return {n: s.epoch for n, s in self.streams.items()}

    def state(self) -> dict:
        return {"credit": self.credit.tolist(), "sequences": dict(self.sequences),
                "streams": {n: {"epoch": s.epoch, "position": s.position} for n, s in self.streams.items()}}

    def load_state(self, state: dict) -> None:
        self.credit = np.array(state["credit"], dtype=np.float64)
        self.sequences = dict(state["sequences"])
        for name, saved in state["streams"].items():
            stream = self.streams[name]
            stream.epoch, stream.position = saved["epoch"], saved["position"]
            stream._shuffle()
