"""`graft run`: stages in order, skipped when up to date, timings kept from the run that did the work."""

from conftest import run_graft, write_tiny_recipe
from graftlm.recipe import load_recipe
from graftlm.runs import RunDir, read_json


def test_second_run_skips_and_keeps_the_timings_of_the_first(tmp_path, tiny_model_dir, monkeypatch, capsys):
    path = write_tiny_recipe(tmp_path, tiny_model_dir, "seq_len: 32, batch_tokens: 64, max_steps: 2")
    runs = str(tmp_path / "runs")
    assert run_graft(monkeypatch, capsys, "run", str(path), "--runs-dir", runs)[0] == 0
    run = RunDir.for_recipe(load_recipe(path), runs)
    first = read_json(run.timings)
    assert set(first) == {"base", "pack", "train", "report"}  # curate, vocab and merge have no section
    code, _, err = run_graft(monkeypatch, capsys, "run", str(path), "--runs-dir", runs)
    assert code == 0 and "pack vi: up to date" in err and "train: up to date" in err
    again = read_json(run.timings)
    assert {k: again[k] for k in ("base", "pack", "train")} == {k: first[k] for k in ("base", "pack", "train")}
    assert (run.model / "README.md").is_file() and run.report.is_file()


def test_graft_train_on_a_fresh_recipe_prepares_what_it_needs(tmp_path, tiny_model_dir, monkeypatch, capsys):
    extra = "curate: {sources: [vi], workers: 1, minhash: false, filters: {fineweb_quality: false}}"
    path = write_tiny_recipe(tmp_path, tiny_model_dir, "seq_len: 32, batch_tokens: 64, max_steps: 2", extra)
    runs = str(tmp_path / "runs")
    code, _, err = run_graft(monkeypatch, capsys, "train", str(path), "--runs-dir", runs)
    assert code == 0, err
    run = RunDir.for_recipe(load_recipe(path), runs)
    assert list(read_json(run.timings)) == ["base", "curate", "pack", "train"]  # in order, as make would
    assert (run.curated / "vi/stats.json").is_file() and run.train_marker.is_file()
    assert not run.report.exists()  # only what training needs
