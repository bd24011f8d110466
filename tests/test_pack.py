import json
import os

import numpy as np
from transformers import AutoTokenizer

from conftest import DATA
from graftlm.data.config import PackConfig, SourceConfig
from graftlm.data.pack import PackedSource, pack_source, token_dtype
from graftlm.data.read import read_documents

VI = SourceConfig(paths=[str(DATA / "vi/viwiki.jsonl")], max_documents=40)


def all_tokens(folder) -> np.ndarray:
    return np.concatenate([np.asarray(m) for m in PackedSource.open(folder).memmaps()])


def test_manifest_counts_match_an_independent_count(tmp_path, smol_tokenizer_dir):
    manifest = pack_source("vi", VI, smol_tokenizer_dir, tmp_path / "vi")
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    docs = list(read_documents(VI))
    assert manifest["documents"] == len(docs) == 40
    assert manifest["tokens"] == sum(len(tok(d).input_ids) + 1 for d in docs)
    assert manifest["bytes"] == sum(len(d.encode()) for d in docs)
    assert manifest["dtype"] == "uint16" and len(manifest["tokenizer"]) == 16
    tokens = all_tokens(tmp_path / "vi")
    eos = np.flatnonzero(tokens == tok.eos_token_id)
    assert len(eos) == 40 and eos[-1] == len(tokens) - 1
    assert tok.decode(tokens[: eos[0]].tolist()) == docs[0]  # the first document, then EOS


def test_packing_is_deterministic_and_shards_split(tmp_path, smol_tokenizer_dir):
    pack_source("vi", VI, smol_tokenizer_dir, tmp_path / "a", PackConfig(batch_bytes=50_000))
    pack_source("vi", VI, smol_tokenizer_dir, tmp_path / "b", PackConfig(batch_bytes=50_000))
    pack_source("vi", VI, smol_tokenizer_dir, tmp_path / "c", PackConfig(batch_bytes=7_000, shard_tokens=20_000))
    assert (tmp_path / "a/shard-00000.bin").read_bytes() == (tmp_path / "b/shard-00000.bin").read_bytes()
    shards = PackedSource.open(tmp_path / "c").shards()
    assert len(shards) > 1 and all(s.tokens == 20_000 for s in shards[:-1])
    assert np.array_equal(all_tokens(tmp_path / "a"), all_tokens(tmp_path / "c"))


def test_the_pack_stage_skips_unchanged_sources_and_repacks_a_changed_one(tmp_path, tiny_model_dir):
    from graftlm.pipeline import run_stages
    from graftlm.recipe import validate_recipe
    from graftlm.runs import RunDir

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"text": "Xin chào thế giới"}) + "\n")
    b.write_text(json.dumps({"text": "Hello world, and hello again to the whole wide world"}) + "\n")
    recipe = validate_recipe({"name": "p", "base_model": str(tiny_model_dir),
                              "sources": {"a": {"paths": [str(a)]}, "b": {"paths": [str(b)]}},
                              "train": {"seq_len": 8}})
    run = RunDir.for_recipe(recipe, tmp_path / "runs")
    run_stages(recipe, run, ("pack",))
    stamps = {n: os.stat(run.packed / n / "shard-00000.bin").st_mtime_ns for n in "ab"}
    run_stages(recipe, run, ("pack",))
    assert {n: os.stat(run.packed / n / "shard-00000.bin").st_mtime_ns for n in "ab"} == stamps
    a.write_text(json.dumps({"text": "Xin chào thế giới"}) + "\n" + json.dumps({"text": "Hai"}) + "\n")
    run_stages(recipe, run, ("pack",))
    assert PackedSource.open(run.packed / "a").manifest["documents"] == 2
    assert os.stat(run.packed / "b" / "shard-00000.bin").st_mtime_ns == stamps["b"]


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(49152) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(151_000) == np.uint32
