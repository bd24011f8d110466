"""The verdict and the report page, from a run directory with a known metrics.jsonl."""


import pytest

from conftest import run_graft
from graftlm.recipe import load_recipe
from graftlm.report.page import build_report
from graftlm.report.verdict import compute_verdict
from graftlm.runs import RunDir

RECIPE = """
name: rep
sources:
  vi: {paths: [a.jsonl], lang: vi}
  en: {paths: [b.jsonl], lang: en}
mixture: {vi: 0.75, en: 0.25}
eval:
  text: {vi: v.tsv, en: e.tsv}
  choice: {xcopa_vi: {path: x.jsonl, lang: vi}, xcopa_en: {path: y.jsonl, lang: en}}
report: {source_margin_bpb: 0.05}
"""


def evaluation(step, vi, en, acc_vi, acc_en):
    text = {"vi": {"bpb": vi, "tokens_per_byte": 0.5, "tokens_per_word": 3.0, "documents": 10},
            "en": {"bpb": en, "tokens_per_byte": 0.25, "tokens_per_word": 1.3, "documents": 10}}
    choice = {"xcopa_vi": {"accuracy": acc_vi, "accuracy_norm": acc_vi, "ci95": [0.4, 0.6], "n": 100},
              "xcopa_en": {"accuracy": acc_en, "accuracy_norm": acc_en, "ci95": [0.5, 0.7], "n": 100}}
    return {"step": step, "tokens": step * 100, "eval": {"text": text, "choice": choice}}


@pytest.fixture
def run(tmp_path):
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    recipe = load_recipe(tmp_path / "recipe.yaml")
    run = RunDir(tmp_path / "runs/rep")
    run.write_recipe(recipe)
    run.append_metrics(evaluation(0, 2.5, 1.30, 0.48, 0.60))
    for step in range(1, 5):
        run.append_metrics({"step": step, "tokens": step * 100, "loss": 3 - step * 0.1, "lr": 1e-4, "grad_norm": 1.0,
                            "tokens_per_s": 50.0, "tokens_by_source": {"vi": step * 75, "en": step * 25}})
        if step % 2 == 0:
            run.append_metrics(evaluation(step, 2.5 - 0.1 * step, 1.30 + (0.06 if step == 2 else 0.02), 0.5, 0.58))
    return recipe, run


def test_verdict_splits_target_gain_from_source_loss(run):
    recipe, run_dir = run
    assert recipe.target_language == "vi"
    verdict = compute_verdict(recipe, run_dir.read_metrics())
    by_name = {c.name: c for c in verdict.changes}
    assert by_name["vi"].role == "target" and by_name["vi"].delta == pytest.approx(-0.4) and by_name["vi"].better
    assert by_name["en"].role == "source" and by_name["en"].delta == pytest.approx(0.02) and not by_name["en"].better
    assert by_name["xcopa_en"].role == "source" and by_name["xcopa_en"].delta == pytest.approx(-0.02)
    assert verdict.source_kept  # +0.02 <= 0.05, although the curve went to +0.06 on the way (the stability gap)
    assert "within the margin" in verdict.summary()
    assert [c.name for c in verdict.changes] == ["vi", "xcopa_vi", "en", "xcopa_en"]


def test_report_page_is_self_contained(run):
    recipe, run_dir = run
    build_report(recipe, run_dir)
    page = run_dir.report.read_text()
    assert page.count("<img src='data:image/png;base64,") == 4  # loss+lr, bpb, accuracy, tokens per source
    assert "-0.4000 better" in page and "+0.0200 worse" in page
    assert "http" not in page.replace("https://pypi", "")  # nothing fetched from elsewhere


def test_verdict_waits_for_two_evaluations(tmp_path):
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    recipe = load_recipe(tmp_path / "recipe.yaml")
    assert compute_verdict(recipe, [evaluation(0, 2.5, 1.3, 0.5, 0.5)]) is None


def test_graft_report_rebuilds_and_prints_the_verdict(run, monkeypatch, capsys):
    _, run_dir = run
    code, _, err = run_graft(monkeypatch, capsys, "report", str(run_dir.root))
    assert code == 0 and "verdict" in err and "report.html" in err
    code, _, err = run_graft(monkeypatch, capsys, "report", str(run_dir.root / "nope"))
    assert code == 2 and "not a run directory" in err


def test_target_bytes_per_second_from_the_packed_manifests(run):
    """Training throughput in bytes of target text: target tokens read × that source's bytes per token / seconds,
    in the page and the model card."""
    from graftlm.report.page import target_bytes_per_s
    from graftlm.runs import write_json_atomic

    recipe, run_dir = run
    for name, tokens, size in (("vi", 1000, 4000), ("en", 1000, 5000)):
        write_json_atomic(run_dir.packed / name / "manifest.json", {"source": name, "tokens": tokens, "bytes": size,
                                                                    "documents": 1, "shards": []})
    training = {"tokens": 400, "step": 4, "elapsed_s": 10.0, "tokens_by_source": {"vi": 300, "en": 100}}
    assert target_bytes_per_s(recipe, run_dir, training) == pytest.approx(300 * 4.0 / 10.0)
    assert target_bytes_per_s(recipe, run_dir, {}) is None
    (run_dir.root / "model").mkdir()
    (run_dir.root / "model" / "config.json").write_text("{}")
    write_json_atomic(run_dir.root / "model" / "graft-train.json", training)
    build_report(recipe, run_dir)
    assert "120 bytes of vi text/s" in run_dir.report.read_text()
    assert "120 bytes of vi text a second" in (run_dir.root / "model" / "README.md").read_text()
