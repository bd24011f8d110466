import gzip
import json
from pathlib import Path

import pytest
import zstandard

from conftest import run_graft
from graftlm.data.config import SourceConfig
from graftlm.data.read import ReadStats, read_documents, read_records
from graftlm.errors import DataError


def source(*paths, **kw) -> SourceConfig:
    return SourceConfig(paths=[str(p) for p in paths], **kw)


def test_jsonl_plain_gz_and_zst(tmp_path):
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(["một", "hai", "ba"]))
    (tmp_path / "a.jsonl").write_text(lines)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(lines)
    with zstandard.open(tmp_path / "c.jsonl.zst", "wt") as f:
        f.write(lines)
    stats = ReadStats()
    docs = list(read_documents(source(tmp_path / "*.jsonl*"), stats=stats))
    assert docs == ["một", "hai", "ba"] * 3
    assert stats.files == 3 and stats.documents == 9 and stats.bytes == 3 * len("mộthaiba".encode())


def test_txt_document_modes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\nsecond line\n\nthird\n")
    assert list(read_documents(source(path, txt_documents="line"))) == ["first line", "second line", "third"]
    assert list(read_documents(source(path, txt_documents="paragraph"))) == ["first line\nsecond line", "third"]
    assert list(read_documents(source(path, txt_documents="file"))) == ["first line\nsecond line\n\nthird\n"]


def test_tsv_column_and_parquet(tmp_path):
    (tmp_path / "a.tsv").write_text("index_id\ttext\n1\tXin chào\n2\tTạm biệt\n")
    assert list(read_documents(source(tmp_path / "a.tsv"))) == ["Xin chào", "Tạm biệt"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a", "b", "c"]}), tmp_path / "a.parquet", row_group_size=2)
    assert list(read_documents(source(tmp_path / "a.parquet", text_field="content"))) == ["a", "b", "c"]


def test_records_know_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n')
    assert [(r.text, r.line) for r in read_records(source(tmp_path / "a.jsonl"))] == [("x", 1), ("y", 3)]


def bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file or glob, the error message it must give)."""
    ok = '{"text": "fine"}\n'
    (tmp_path / "json.jsonl").write_text(ok + '{"text" "no colon"}\n')
    (tmp_path / "field.jsonl").write_text(ok + ok + '{"title": "no text"}\n')
    (tmp_path / "utf8.jsonl").write_bytes(ok.encode() + b'{"text": "caf\xe9"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "notstr.jsonl").write_text('{"text": 3}\n')
    (tmp_path / "cols.tsv").write_text("id\ttext\n1\tok\n2\n")
    return {
        "json": (tmp_path / "json.jsonl", f"{tmp_path}/json.jsonl:2: invalid JSON: Expecting ':' delimiter (column 9)"),
        "field": (tmp_path / "field.jsonl", f"{tmp_path}/field.jsonl:3: no field 'text' (fields: title)"),
        "utf8": (tmp_path / "utf8.jsonl", f"{tmp_path}/utf8.jsonl:2: not valid UTF-8 (byte 0xe9 at column 14)"),
        "empty": (tmp_path / "empty.jsonl", f"{tmp_path}/empty.jsonl: empty file"),
        "notstr": (tmp_path / "notstr.jsonl", f"{tmp_path}/notstr.jsonl:1: field 'text' is int, expected a string"),
        "columns": (tmp_path / "cols.tsv", f"{tmp_path}/cols.tsv:3: expected 2 tab-separated columns, got 1"),
        "missing": (tmp_path / "nope.jsonl", f"{tmp_path}/nope.jsonl: no such file (sources.s.paths)"),
        "glob": (tmp_path / "none-*.jsonl", f"{tmp_path}/none-*.jsonl: glob matches no file (sources.s.paths)"),
    }


@pytest.mark.parametrize("kind", ["json", "field", "utf8", "empty", "notstr", "columns", "missing", "glob"])
def test_bad_input_stops_with_file_and_line(tmp_path, kind):
    path, message = bad_inputs(tmp_path)[kind]
    with pytest.raises(DataError) as e:
        list(read_documents(source(path), "s"))
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_on_error_skip_counts_bad_records(tmp_path):
    cases = bad_inputs(tmp_path)
    paths = [cases[k][0] for k in ("json", "field", "utf8", "empty", "notstr")]
    stats = ReadStats()
    docs = list(read_documents(source(*paths, on_error="skip"), "s", stats))
    assert docs == ["fine"] * 4
    assert dict(stats.skipped) == {"invalid JSON": 1, "missing field": 1, "not UTF-8": 1, "empty file": 1,
                                   "field not text": 1}
    assert stats.first_skipped[0].startswith(f"{tmp_path}/json.jsonl:2:")


def test_truncated_gzip_is_reported(tmp_path):
    data = gzip.compress(b'{"text": "a"}\n' * 1000)
    (tmp_path / "t.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t.jsonl.gz:\d+: cannot read"):
        list(read_documents(source(tmp_path / "t.jsonl.gz")))


def test_reading_streams(tmp_path):
    """A reader is lazy: the first document comes out before a bad record far down the file is reached."""
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n' + '{"text": "x"}\n' * 10000 + "not json\n")
    docs = read_documents(source(tmp_path / "a.jsonl"))
    assert next(docs) == "first"


@pytest.mark.parametrize("kind", ["json", "utf8", "glob"])
def test_cli_exits_2_with_one_line(tmp_path, monkeypatch, capsys, tiny_model_dir, kind):
    path, message = bad_inputs(tmp_path)[kind]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: bad\nbase_model: {tiny_model_dir}\nsources:\n  s: {{paths: ['{path}']}}\n"
                      "train: {seq_len: 32, batch_tokens: 64}\n")  # the tiny model has 256 positions
    code, _, err = run_graft(monkeypatch, capsys, "prepare", str(recipe), "--runs-dir", str(tmp_path / "runs"))
    assert code == 2
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and error_lines[0].startswith(f"error: {message}")
    assert not (tmp_path / "runs/bad/packed/s").exists()  # nothing half-written
