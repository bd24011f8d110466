"""The fault suite: what a careless or hostile user (or a full disk, a kill, a cut download) does to a run, each as a
regression test with its bad file made here, on tiny models. Every case must end in one line that names the key or
the file (a GraftError, or an OSError the CLI prints in one line), never a traceback, never a silent short read,
and no data lost. Then a hypothesis fuzz of the readers (truncations, flipped bytes, random bytes) and of recipes
(random YAML values). Two writers at once and signals (SIGTERM, SIGUSR1, SIGINT, SIGKILL of `graft run`) are in
tests/test_preemption.py; bench/kill_suite.py kills `graft run` at random points of every stage."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DATA, REPO, run_graft, train, write_tiny_recipe
from graftlm.data.config import SourceConfig
from graftlm.data.read import ReadStats, read_documents
from graftlm.errors import DataError, GraftError, RecipeError
from graftlm.recipe import Recipe, load_recipe, validate_recipe
from graftlm.runs import RunDir, atomic_dir, inside, remove_stale_tree

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
VI = str(DATA / "vi/viwiki.jsonl")


def minimal(**extra) -> dict:
    return {"name": "f", "sources": {"vi": {"paths": [VI], "lang": "vi"}}, **extra}


def one_line(message: str) -> bool:
    return "\n" not in message and "Traceback" not in message


# ---- 1. containment: no recipe value leaves the run directory ----------------------------------------------------

HOSTILE_NAMES = ["/tmp/victim", "../../victim", "a/../../b", "..", ".", "~root", "a\\b", "", "x\0y", ".hidden", "a b"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_source_name_that_is_not_a_plain_name_is_refused(name):
    with pytest.raises(RecipeError) as e:
        validate_recipe({"name": "f", "sources": {name: {"paths": [VI]}}})
    assert str(e.value).startswith(f"sources.{name}: a source's name must be") and "\n" not in str(e.value)


def test_names_in_any_script_are_plain_names():
    recipe = validate_recipe({"name": "thử-nghiệm", "sources": {"tiếng-việt": {"paths": [VI]}, "中文": {"paths": [VI]}}})
    assert list(recipe.sources) == ["tiếng-việt", "中文"]
    with pytest.raises(RecipeError, match="^name: must be"):
        validate_recipe({"name": "../up", "sources": {"vi": {"paths": [VI]}}})


def _bypass(recipe: Recipe, **names) -> Recipe:
    """A recipe whose names skipped validation: the second fence (inside()) must hold on its own."""
    if "source" in names:
        recipe.sources[names["source"]] = recipe.sources.pop("vi")
    if "name" in names:
        object.__setattr__(recipe, "name", names["name"])
    return recipe


@pytest.fixture
def victim(tmp_path) -> Path:
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "important.txt").write_text("keep me")
    return folder


def test_every_path_building_site_refuses_a_path_outside_the_run(tmp_path, victim):
    from graftlm.compare import make_variants
    from graftlm.curate.stage import curate_source
    from graftlm.data.stage import Pack, training_source

    escape = os.path.relpath(victim, tmp_path / "runs/f/packed")
    run = RunDir(tmp_path / "runs/f")
    sites = {
        "runs/<name>": lambda: RunDir.for_recipe(_bypass(validate_recipe(minimal()), name=str(victim)), tmp_path),
        "packed/<source>": lambda: Pack(_bypass(validate_recipe(minimal()), source=escape), run).run(escape, ""),
        "curated/<source> (read by pack)": lambda: training_source(
            run, _bypass(validate_recipe(minimal(curate={})), source=escape), escape),
        "curated/<source>, curated/.work/<source>, curated/excluded/<source>": lambda: curate_source(
            "f", escape, SourceConfig(paths=[VI], lang="vi"), validate_recipe(minimal(curate={})).curate, run.curated),
        "compare/<variant>": lambda: run.inside("compare", str(victim)),
    }
    for site, build in sites.items():
        with pytest.raises(GraftError, match="not a plain name") as e:
            build()
        assert one_line(str(e.value)), site
    assert (victim / "important.txt").read_text() == "keep me" and sorted(os.listdir(victim)) == ["important.txt"]
    assert not (tmp_path / "runs/f").exists()
    # compare builds its variant names from values: whatever the values, each folder stays in compare/
    for variant in make_variants([f"train.lr={victim},../../x", "train.seed=..,/"]):
        assert run.inside("compare", variant.name).parent == run.root / "compare"


def test_inside_allows_plain_parts_only(tmp_path):
    assert inside(tmp_path, "packed", "vi") == tmp_path / "packed/vi"
    for parts in [("..",), ("packed", "../x"), ("/abs",), ("",), ("a/b",)]:
        with pytest.raises(GraftError):
            inside(tmp_path, *parts)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_processes_are_removed_and_an_interrupted_replace_is_undone(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    packed = tmp_path / "runs/f/packed"
    for name in (f"vi.tmp-{dead}", f"en.old-{dead}", f"zh.old-{dead}", f"id.tmp-{alive}"):
        (packed / name).mkdir(parents=True)
    (packed / "en").mkdir()  # en was replaced: its .old- copy is garbage
    (packed / f"zh.old-{dead}" / "manifest.json").write_text("{}")  # zh was killed between its two renames
    (tmp_path / f"runs/f/metrics.jsonl.tmp-{dead}").write_text("x")
    removed = remove_stale_tree(tmp_path / "runs/f")
    assert sorted(p.name for p in removed) == sorted([f"vi.tmp-{dead}", f"en.old-{dead}", f"metrics.jsonl.tmp-{dead}"])
    assert sorted(os.listdir(packed)) == sorted(["en", "zh", f"id.tmp-{alive}"])  # a live process's work is kept
    assert (packed / "zh/manifest.json").is_file()
    (packed / f"vi.tmp-{dead}").mkdir()
    with atomic_dir(packed / "vi") as tmp:  # every atomic write cleans beside itself
        (tmp / "a").write_text("a")
    assert sorted(os.listdir(packed)) == sorted(["en", "vi", "zh", f"id.tmp-{alive}"])


# ---- 5. recipes: YAML booleans and NaN are not numbers, in any section -----------------------------------------

def _numeric_keys(model: type, prefix: str = "") -> list[str]:
    """Every key of the recipe whose value is a number (int or float, possibly optional), with its path."""
    import typing

    from pydantic import BaseModel

    keys = []
    for name, info in model.model_fields.items():
        args = [a for a in typing.get_args(info.annotation) or (info.annotation,) if a is not type(None)]
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if any(a in (int, float) for a in args) and bool not in args:
            keys.append(prefix + name)
        for sub in nested:
            keys += _numeric_keys(sub, f"{prefix}{name}.")
    return keys


def test_a_boolean_where_a_number_belongs_names_the_key_for_every_numeric_key(tmp_path):
    from graftlm.recipe import apply_override

    base = minimal(curate={}, vocab={}, merge={}, train={"ema": {}, "distill": {}})
    tried = 0
    for key in _numeric_keys(Recipe):
        data = json.loads(json.dumps(base))
        apply_override(data, f"{key}=1")
        try:
            validate_recipe(data)
        except RecipeError:
            continue  # 1 is not a valid value here (or the section needs more keys): nothing to compare with
        apply_override(data, f"{key}=true")
        with pytest.raises(RecipeError) as e:
            validate_recipe(data)
        assert str(e.value).startswith(f"{key}: expected"), str(e.value)
        tried += 1
    assert tried >= 40, tried
    with pytest.raises(RecipeError, match=r"^train\.lr: input should be a finite number"):
        validate_recipe(minimal(train={"lr": float("nan")}))
    with pytest.raises(RecipeError, match=r"^mixture: vi: expected a number, got true"):
        validate_recipe(minimal(mixture={"vi": True}))


YAML_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                        st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3),
                        st.dictionaries(st.text(max_size=5), st.integers(-3, 3), max_size=2))
SOME_KEYS = ["name", "base_model", "trust_remote_code", "sources", "sources.vi", "sources.vi.paths",
             "sources.vi.format", "sources.vi.max_documents", "sources.vi.lang", "mixture", "mixture.vi",
             "mixture.repeat", "pack.shard_tokens", "train", "train.seq_len", "train.batch_tokens", "train.lr",
             "train.max_steps", "train.method", "train.lora", "train.lora.r", "train.freeze.layers", "train.ema",
             "train.schedule", "train.stages", "eval.text", "eval.every", "eval.choice", "curate", "curate.sources",
             "curate.minhash.n_grams", "curate.rehydrate", "vocab", "vocab.new_tokens", "merge", "merge.alpha",
             "report", "extends"]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(SOME_KEYS), YAML_VALUES), min_size=1, max_size=3))
def test_fuzz_recipes_give_a_recipe_or_one_recipe_error(tmp_path_factory, changes):
    from graftlm.recipe import apply_override

    folder = tmp_path_factory.mktemp("r")
    data = minimal()
    for key, value in changes:
        try:
            apply_override(data, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
        except RecipeError:
            continue
    (folder / "r.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    try:
        load_recipe(folder / "r.yaml")
    except RecipeError as e:
        assert one_line(str(e))


# ---- 5. readers: a damaged file is a bad record, never a shorter corpus ----------------------------------------

DOCS = [f"tài liệu {i}: " + "chữ " * (i % 7) + "end" for i in range(300)]


def _write(path: Path, docs: list[str] = DOCS, zstd_frames: int = 1) -> bytes:
    """A valid file of `docs` in the format its name says; returns its bytes."""
    name = path.name
    if ".parquet" in name:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), path, row_group_size=64)
        return path.read_bytes()
    if ".tsv" in name:
        text = "id\ttext\n" + "".join(f"{i}\t{d}\n" for i, d in enumerate(docs))
    elif ".txt" in name:
        text = "".join(d + "\n" for d in docs)
    else:
        text = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    raw = text.encode()
    if name.endswith(".gz"):
        raw = gzip.compress(raw, mtime=0)
    elif name.endswith(".zst"):
        step = -(-len(raw) // zstd_frames)
        raw = b"".join(zstandard.ZstdCompressor(write_checksum=True).compress(raw[i:i + step])
                       for i in range(0, len(raw), step))
    path.write_bytes(raw)
    return raw


def _read(path: Path, on_error: str = "stop") -> tuple[list[str] | None, ReadStats, str | None]:
    stats = ReadStats()
    try:
        return list(read_documents(SourceConfig(paths=[str(path)], on_error=on_error), "s", stats)), stats, None
    except DataError as e:
        return None, stats, str(e)


def test_a_cut_txt_zst_is_an_error_and_skip_counts_it(tmp_path):
    path = tmp_path / "a.txt.zst"
    raw = _write(path, zstd_frames=4)
    assert _read(path)[0] == DOCS  # several frames, read to the end
    path.write_bytes(raw[: len(raw) * 3 // 4])
    docs, _, error = _read(path)
    assert docs is None and error.startswith(f"{path}:") and "cut short" in error
    docs, stats, _ = _read(path, "skip")
    assert stats.skipped == {"unreadable file": 1} and docs == DOCS[:len(docs)] and len(docs) < len(DOCS)


def test_a_cut_small_jsonl_zst_is_not_called_empty(tmp_path):
    path = tmp_path / "s.jsonl.zst"
    raw = _write(path, DOCS[:1])
    path.write_bytes(raw[:-5])
    _, stats, error = _read(path)
    assert "cut short" in error and "empty" not in error
    assert _read(path, "skip")[1].skipped == {"unreadable file": 1}  # one problem, counted once


@pytest.mark.parametrize("name", ["a.jsonl.gz", "a.tsv.gz", "a.txt.zst"])
def test_a_corrupt_compressed_file_is_a_bad_record(tmp_path, name):
    path = tmp_path / name
    raw = bytearray(_write(path))
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    docs, _, error = _read(path)
    assert docs is None and error.startswith(f"{path}:") and one_line(error)


def test_a_damaged_parquet_page_is_a_bad_record(tmp_path):
    path = tmp_path / "a.parquet"
    raw = bytearray(_write(path))
    for i in range(200, 900):  # inside the first pages' data, well before the footer
        raw[i] = 0xAB
    path.write_bytes(bytes(raw))
    docs, _, error = _read(path)
    assert docs is None and error.startswith(f"{path}") and one_line(error)


FORMATS = ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.tsv", "a.tsv.zst", "a.txt.gz", "a.parquet"]


@FUZZ
@given(st.sampled_from(FORMATS), st.floats(0, 1, exclude_max=True), st.booleans())
def test_fuzz_cut_files_give_an_error_or_the_documents_before_the_cut(tmp_path_factory, name, where, skip):
    path = tmp_path_factory.mktemp("cut") / name
    raw = _write(path)
    path.write_bytes(raw[: int(len(raw) * where)])
    docs, stats, error = _read(path, "skip" if skip else "stop")
    assert error is None or one_line(error)
    if docs is None:
        return
    if name.endswith((".gz", ".zst", ".parquet")):  # formats that know their own end: a cut never goes unnoticed
        assert docs == DOCS or sum(stats.skipped.values()) > 0
        assert docs == DOCS[:len(docs)]
    else:  # plain text has no end marker: only the last document may be cut (at a line's end, nothing shows)
        assert not docs or docs[:-1] == DOCS[:len(docs) - 1] and DOCS[len(docs) - 1].startswith(docs[-1])


@FUZZ
@given(st.sampled_from(FORMATS), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                           min_size=1, max_size=4))
def test_fuzz_flipped_bytes_give_an_error_or_documents_never_a_traceback(tmp_path_factory, name, flips):
    path = tmp_path_factory.mktemp("flip") / name
    raw = bytearray(_write(path))
    for where, mask in flips:
        raw[int(len(raw) * where)] ^= mask
    path.write_bytes(bytes(raw))
    docs, _, error = _read(path)
    assert error is None or one_line(error)
    if docs is not None and name.endswith((".gz", ".zst")):  # both carry a checksum of the content
        assert docs == DOCS


@FUZZ
@given(st.sampled_from(FORMATS), st.binary(max_size=400))
def test_fuzz_random_bytes_give_an_error_or_documents(tmp_path_factory, name, data):
    path = tmp_path_factory.mktemp("rand") / name
    path.write_bytes(data)
    for on_error in ("stop", "skip"):
        docs, _, error = _read(path, on_error)
        assert (docs is None) != (error is None) and (error is None or one_line(error))


# ---- 5. models: a damaged file is one line naming it; problems found before any work -------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    import gguf
    import numpy as np

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.ones((32, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _damaged_models(folder: Path, tiny_model_dir: Path, tiny_gguf: Path) -> dict[str, tuple[Path, str]]:
    """name -> (model path, the file its error must name)."""
    cases = {}
    data = (tiny_model_dir / "model.safetensors").read_bytes()
    for case, size in [("safetensors cut", len(data) // 2), ("safetensors empty", 0), ("safetensors header cut", 100)]:
        model = folder / case.replace(" ", "-")
        shutil.copytree(tiny_model_dir, model)
        (model / "model.safetensors").write_bytes(data[:size])
        cases[case] = (model, model / "model.safetensors")
    data = tiny_gguf.read_bytes()
    for case, size in [("gguf header cut", 40), ("gguf data cut", len(data) - 100), ("gguf empty", 0)]:
        path = folder / f"{case.replace(' ', '-')}.gguf"
        path.write_bytes(data[:size])
        cases[case] = (path, path)
    evil = folder / "pickle"
    evil.mkdir()
    shutil.copy(tiny_model_dir / "config.json", evil)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > pwned.txt",))

    torch.save({"model.embed_tokens.weight": Evil()}, evil / "pytorch_model.bin")
    cases["malicious pickle"] = (evil, evil / "pytorch_model.bin")
    return cases


def test_damaged_model_files_are_one_line_naming_the_file(tmp_path, tiny_model_dir, tiny_gguf, monkeypatch):
    from graftlm.models import load_model, load_tokenizer

    monkeypatch.chdir(tmp_path)
    for case, (model, named) in _damaged_models(tmp_path, tiny_model_dir, tiny_gguf).items():
        for load in (load_model, load_tokenizer) if case != "malicious pickle" else (load_model,):
            with pytest.raises(GraftError) as e:
                load(str(model))
            assert str(e.value).startswith(str(named)) and one_line(str(e.value)), (case, str(e.value))
    assert not (tmp_path / "pwned.txt").exists()


def test_problems_are_found_before_any_work(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import time

    from graftlm.checks import check_inputs

    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "quá ngắn"}\n')
    small = {"seq_len": 32, "batch_tokens": 64}
    cases = {
        "train.seq_len: 512 is more than the 256 positions": dict(train={"seq_len": 512, "batch_tokens": 512}),
        "eval.max_length: 1000 is more than the 256 positions": dict(eval={"max_length": 1000}, train=small),
        f"{tmp_path}/nope.jsonl: no such file (sources.vi.paths)": dict(sources={"vi": {"paths": ["nope.jsonl"]}}),
        f"{tmp_path}/*.txt: glob matches no file": dict(sources={"vi": {"paths": ["*.txt"]}}),
        f"sources.vi: {short.stat().st_size} bytes of text make fewer tokens than one training sequence":
            dict(sources={"vi": {"paths": [str(short)]}}, train={"seq_len": 128, "batch_tokens": 128}),
        f"base_model: {tmp_path}/models/tiny: no such file or folder": dict(base_model="models/tiny"),  # a typo
        "base_model: 'nobody/no-such-model' is neither a file or folder here nor in the local Hugging Face cache":
            dict(base_model="nobody/no-such-model"),
        f"{tmp_path}/eval.tsv: no such file (eval.text.vi)": dict(eval={"text": {"vi": "eval.tsv"}}),
    }
    (tmp_path / "models").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for message, changes in cases.items():
        data = {"name": "early", "base_model": str(tiny_model_dir), "train": small,
                "sources": {"vi": {"paths": [VI], "max_documents": 5}}, **changes}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
        started = time.perf_counter()
        with pytest.raises(GraftError) as e:
            check_inputs(load_recipe(tmp_path / "r.yaml"))
        assert str(e.value).startswith(message) and one_line(str(e.value)), str(e.value)
        assert time.perf_counter() - started < 2
    # through the CLI: exit 2, one line, before the base model is exported
    code, _, err = run_graft(monkeypatch, capsys, "prepare", str(tmp_path / "r.yaml"), "--runs-dir",
                             str(tmp_path / "runs"))
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}")
    assert not (tmp_path / "runs/early/base").exists()


# ---- 3. checkpoints that prove themselves ---------------------------------------------------------------------

def _saved_checkpoints(run: RunDir, tiny_model_dir: Path, steps=(1, 2)) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graftlm.train.checkpoint import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in steps:
        save_checkpoint(run, step, model, tokenizer, optimizer, {"step": step, "recipe": {}, "data": {}}, keep=5)


def _truncate(path: Path, fraction: float) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


DAMAGE = {
    "model.safetensors cut": lambda f: _truncate(f / "model.safetensors", 0.5),
    "model.safetensors empty": lambda f: _truncate(f / "model.safetensors", 0),
    "model.safetensors one bit flipped": lambda f: _flip(f / "model.safetensors"),
    "training_state.pt missing": lambda f: (f / "training_state.pt").unlink(),
    "training_state.pt cut": lambda f: _truncate(f / "training_state.pt", 0.7),
    "trainer_state.json not JSON": lambda f: (f / "trainer_state.json").write_text('{"step": 2, "rec'),
    "trainer_state.json same size, other bytes": lambda f: _flip(f / "trainer_state.json"),
    "manifest.json damaged": lambda f: (f / "manifest.json").write_text("[]"),
}


def test_a_damaged_checkpoint_is_moved_aside_and_the_previous_one_used(tmp_path, tiny_model_dir, capsys):
    from graftlm.train.checkpoint import checkpoint_problem, latest_valid_checkpoint

    pristine = RunDir(tmp_path / "pristine")
    _saved_checkpoints(pristine, tiny_model_dir)
    assert checkpoint_problem(pristine.checkpoints / "step-000002") is None
    for case, damage in DAMAGE.items():
        run = RunDir(tmp_path / case.replace(" ", "_"))
        shutil.copytree(pristine.root, run.root)
        damage(run.checkpoints / "step-000002")
        capsys.readouterr()
        assert latest_valid_checkpoint(run) == run.checkpoints / "step-000001", case
        warnings = [line for line in capsys.readouterr().err.splitlines() if "step-000002" in line]
        assert len(warnings) == 1 and "moved aside" in warnings[0], (case, warnings)
        assert (run.corrupt / "step-000002").is_dir()  # kept, not deleted
    # a checkpoint of an older graftlm (no manifest) is still checked for what its files say of themselves
    run = RunDir(tmp_path / "legacy")
    shutil.copytree(pristine.root, run.root)
    for folder in run.checkpoints.iterdir():
        (folder / "manifest.json").unlink()
    assert latest_valid_checkpoint(run) == run.checkpoints / "step-000002"
    _truncate(run.checkpoints / "step-000002/model.safetensors", 0.5)
    assert latest_valid_checkpoint(run) == run.checkpoints / "step-000001"


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_with_free_and_needed(tmp_path, tiny_model_dir, monkeypatch):
    import graftlm.train.checkpoint as checkpoint
    from graftlm.cli import describe_os_error

    run = RunDir(tmp_path / "run")
    _saved_checkpoints(run, tiny_model_dir, steps=(1,))

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=10_000_000_000))
    with pytest.raises(RuntimeError):  # plenty of space: not a full disk, the error stays what it is
        _saved_checkpoints(run, tiny_model_dir, steps=(2,))
    frees = iter([10_000_000_000])  # enough space before writing, none once torch.save failed
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=next(frees, 1000)))
    for step in (2, 3):  # 2: torch.save's "unexpected pos" on a full disk; 3: found before writing
        with pytest.raises(OSError) as e:
            _saved_checkpoints(run, tiny_model_dir, steps=(step,))
        assert e.value.errno == errno.ENOSPC and e.value.needed_bytes > 0
    monkeypatch.undo()
    line = describe_os_error(e.value)
    assert "no space left on the disk" in line and "needed" in line and line.startswith(str(run.checkpoints))
    assert [p.name for p in run.checkpoints.iterdir()] == ["step-000001"]  # nothing half-written


def test_oserrors_are_one_line_naming_the_file(tmp_path, tiny_model_dir, monkeypatch, capsys):
    path = write_tiny_recipe(tmp_path, tiny_model_dir, "seq_len: 32, batch_tokens: 64, max_steps: 2")
    for number, reason in [(errno.EROFS, "the file system is read-only"), (errno.EACCES, "permission denied"),
                           (errno.ENOSPC, "no space left on the disk")]:
        def refuse(self, recipe, number=number):
            raise OSError(number, os.strerror(number), str(self.recipe))

        monkeypatch.setattr(RunDir, "write_recipe", refuse)
        code, _, err = run_graft(monkeypatch, capsys, "prepare", str(path), "--runs-dir", str(tmp_path / "runs"))
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {tmp_path}/runs/tiny/recipe.yaml: "
                                                                     f"{reason}"), lines


# ---- the whole path on a tiny model: corrupt checkpoints, a torn metrics line, a read-only run ---------------

TRAIN = "seq_len: 32, batch_tokens: 128, max_steps: 6, lr: 1.0e-3, checkpoint_every: 2, keep_checkpoints: 3"


def test_resume_survives_corrupt_checkpoints_and_a_torn_metrics_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from safetensors.torch import load_file

    from graftlm.pipeline import run_stages

    path = write_tiny_recipe(tmp_path, tiny_model_dir, TRAIN)
    recipe = load_recipe(path)
    run = RunDir.for_recipe(recipe, tmp_path / "runs")
    run_stages(recipe, run, ("base", "pack"))
    train(recipe, run)
    expected = load_file(run.model / "model.safetensors")
    losses = [r["loss"] for r in run.read_metrics() if "loss" in r]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-000002", "step-000004", "step-000006"]

    shutil.rmtree(run.model)  # as if killed after its last checkpoint, which then got damaged, and the one before
    _truncate(run.checkpoints / "step-000006/model.safetensors", 0.5)
    (run.checkpoints / "step-000004/training_state.pt").unlink()
    with open(run.metrics, "a") as f:
        f.write('{"step": 7, "loss": 2.')  # a full disk tears the last line
    capsys.readouterr()
    train(recipe, run)
    err = capsys.readouterr().err
    assert "resuming from step-000002" in err and err.count("moved aside") == 2 and "torn last line" in err
    assert all(torch.equal(t, expected[k]) for k, t in load_file(run.model / "model.safetensors").items())
    assert [r["loss"] for r in run.read_metrics() if "loss" in r] == losses
    assert sorted(os.listdir(run.corrupt)) == ["step-000004", "step-000006"]

    with open(run.metrics, "a") as f:
        f.write('{"step": 6, "ev')
    code, _, err = run_graft(monkeypatch, capsys, "report", str(run.root))
    assert code == 0 and "torn last line" in err and run.report.is_file()
    run.append_metrics({"step": 6, "note": "after a torn line"})  # the torn part is cut, not glued to this record
    assert run.read_metrics()[-1] == {"step": 6, "note": "after a torn line"}

    if shutil.which("unshare") and os.geteuid() == 0:  # a real read-only file system (a mount namespace)
        script = (f"mount --bind {run.root} {run.root} && mount -o remount,ro,bind {run.root} && "
                  f"{sys.executable} -m graftlm report {run.root}")
        result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        if "mount:" not in result.stderr:
            lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            assert result.returncode == 1 and len(lines) == 1 and "read-only" in lines[0], result.stderr[-2000:]
            assert "Traceback" not in result.stderr


def test_a_packed_source_shorter_than_one_sequence_names_the_source(tmp_path):
    """What check_inputs cannot know (a compressed or curated source): said when the sampler opens the sources."""
    import numpy as np

    from graftlm.data.mix import MixtureSampler
    from graftlm.data.pack import PackedSource

    np.arange(20, dtype=np.uint16).tofile(tmp_path / "shard-00000.bin")
    packed = PackedSource(tmp_path, {"dtype": "uint16", "shards": [{"file": "shard-00000.bin", "tokens": 20}]})
    with pytest.raises(DataError, match=r"^sources\.vi: 20 packed tokens, fewer than one training sequence "
                                        r"\(train.seq_len \+ 1 = 33\)"):
        MixtureSampler({"vi": packed}, {"vi": 1.0}, seq_len=32, seed=0)
