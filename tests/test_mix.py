import numpy as np
import pytest

from graftlm.data.mix import MixtureExhausted, MixtureSampler
from graftlm.runs import write_json_atomic
from graftlm.data.pack import PackedSource


def fake_packed(tmp_path, name: str, tokens: np.ndarray, shard_tokens: int) -> PackedSource:
    folder = tmp_path / name
    folder.mkdir()
    shards = []
    for i, start in enumerate(range(0, len(tokens), shard_tokens)):
        part = tokens[start:start + shard_tokens].astype(np.uint16)
        part.tofile(folder / f"shard-{i:05d}.bin")
        shards.append({"file": f"shard-{i:05d}.bin", "tokens": len(part)})
    write_json_atomic(folder / "manifest.json", {"tokens": len(tokens), "shards": shards, "dtype": "uint16",
                                                 "fingerprint": name})
    return PackedSource.open(folder)


@pytest.fixture
def sources(tmp_path):
    return {"a": fake_packed(tmp_path, "a", np.arange(0, 1000), 300),
            "b": fake_packed(tmp_path, "b", np.arange(10_000, 10_400), 400)}


def test_proportions_hold_at_every_point(sources):
    sampler = MixtureSampler(sources, {"a": 0.75, "b": 0.25}, seq_len=9, seed=0)
    names = [sampler.next_sequence()[0] for _ in range(100)]
    for n in range(1, 101):
        assert abs(names[:n].count("a") - 0.75 * n) <= 1
    assert sampler.tokens_by_source(9) == {"a": 75 * 9, "b": 25 * 9}


def test_windows_come_from_one_shard_and_cover_an_epoch(sources):
    sampler = MixtureSampler(sources, {"a": 1.0}, seq_len=9, seed=3)
    windows = [sampler.next_sequence()[1] for _ in range(sampler.streams["a"].windows)]
    starts = sorted(int(w[0]) for w in windows)
    assert all(np.array_equal(w, np.arange(w[0], w[0] + 10)) for w in windows)  # contiguous, 10 tokens
    assert len(set(starts)) == len(starts) == 30 + 30 + 30 + 10  # shards of 300, 300, 300 and 100 tokens
    assert sampler.epochs() == {"a": 0}
    sampler.next_sequence()
    assert sampler.epochs() == {"a": 1}  # a new, reshuffled epoch


def test_same_seed_same_sequences_other_seed_other_order(sources):
    draw = lambda seed: [int(MixtureSampler(sources, {"a": 1, "b": 1}, 9, seed).next_batch(20)[0][i, 0])
                         for i in range(20)]
    assert draw(0) == draw(0) and draw(0) != draw(1)


def test_state_round_trip_resumes_exactly(sources):
    first = MixtureSampler(sources, {"a": 0.6, "b": 0.4}, 9, seed=0)
    first.next_batch(57)
    state = first.state()
    expected = first.next_batch(80)[0]
    second = MixtureSampler(sources, {"a": 0.6, "b": 0.4}, 9, seed=0)
    second.load_state(state)
    assert np.array_equal(second.next_batch(80)[0], expected)


def test_no_repeat_stops_when_a_source_runs_out(sources):
    sampler = MixtureSampler(sources, {"b": 1.0}, 9, seed=0, repeat=False)
    sampler.next_batch(40)
    with pytest.raises(MixtureExhausted):
        sampler.next_sequence()
