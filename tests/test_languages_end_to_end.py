"""The bundled recipes for other script families (recipes/demo-id.yaml: Indonesian, plain ASCII; demo-zh.yaml:
Chinese, no spaces) and a Russian (Cyrillic) run, each through every stage — curate, vocab, pack, train, eval,
report — at a tiny budget on the tiny random model (the real base only changes the numbers, not the path)."""

import json

import pytest

from conftest import DATA, REPO, run_graft
from graftlm.runs import RunDir

TINY_BUDGET = ["train.max_tokens=1024", "train.seq_len=128", "train.batch_tokens=512", "eval.every=null",
               "eval.max_documents=20", "eval.max_items=20", "curate.workers=1", "vocab.new_tokens=300",
               "vocab.compare_inits=false", "train.keep_checkpoints=1"]

RUSSIAN = f"""
name: demo-ru
sources:
  ru: {{paths: ['{DATA}/ru/libreoffice_help.jsonl'], lang: rus_Cyrl, max_documents: 150}}
  en: {{paths: ['{DATA}/en/debian_handbook.jsonl'], lang: en}}
curate: {{sources: [ru], rehydrate: fineweb2, max_repetitions: 3}}
vocab: {{}}
mixture: {{ru: 0.75, en: 0.25}}
eval:
  text: {{ru: '{DATA}/eval/sib200/rus_Cyrl/test.tsv', en: '{DATA}/eval/sib200/eng_Latn/test.tsv'}}
"""


def run_recipe(recipe, tmp_path, monkeypatch, capsys, model) -> tuple[RunDir, str]:
    args = [a for o in [f"base_model={model}", *TINY_BUDGET] for a in ("--set", o)]
    code, _, err = run_graft(monkeypatch, capsys, "run", str(recipe), "--runs-dir", str(tmp_path / "runs"), *args)
    assert code == 0, err
    name = next((tmp_path / "runs").iterdir()).name
    return RunDir(tmp_path / "runs" / name), err


@pytest.mark.parametrize("recipe, target, unit", [
    ("demo-id.yaml", "id", "word"),
    ("demo-zh.yaml", "zh", "character"),
    ("ru", "ru", "word"),
])
def test_every_stage_runs_on_another_script(recipe, target, unit, tmp_path, monkeypatch, capsys, tiny_model_dir):
    if recipe == "ru":
        recipe = tmp_path / "demo-ru.yaml"
        recipe.write_text(RUSSIAN)
    else:
        recipe = REPO / "recipes" / recipe
    run, err = run_recipe(recipe, tmp_path, monkeypatch, capsys, tiny_model_dir)

    # curation with FineWeb2's settings for the language (its language-ID score, its stop words)
    curated = json.loads((run.curated / target / "stats.json").read_text())
    from graftlm.curate.fineweb2 import config_for, rehydration_weights

    fineweb2 = config_for(target)
    assert curated["lang"] == target and curated["settings"]["language_id"]["threshold"] == fineweb2["language_score"]
    assert curated["settings"]["filters"]["gopher_quality"]["stop_words"] == fineweb2["stopwords"]
    assert curated["output"]["documents"] > 0.3 * curated["input"]["documents"]
    if "rehydrate: fineweb2" in recipe.read_text():
        assert curated["settings"]["rehydrate"] == {str(k): v for k, v in rehydration_weights(
            target, 3 if target == "ru" else 5).items()}

    # vocabulary: fertility per word, or per character where words are not space-separated; English protected
    vocab = json.loads((run.vocab / "stats.json").read_text())
    assert vocab["new_tokens"] == 300 and vocab["replay"]["sources"] == ["en"] and vocab["replay"]["words"] > 0
    change = vocab["fertility"][target]
    assert change["unit"] == unit
    assert change["after"][f"tokens_per_{unit}"] < change["before"][f"tokens_per_{unit}"]
    assert vocab["fertility"]["en"]["identical_documents"] >= 0.99
    assert f"tokens per {unit}" in err

    # packing and evaluation read the extended tokenizer; the report names the unit
    assert json.loads((run.packed / target / "manifest.json").read_text())["tokens"] > 0
    final = [r for r in run.read_metrics() if "eval" in r][-1]["eval"]["text"]
    assert f"tokens_per_{unit}" in final[target] and "tokens_per_word" in final["en"]
    page = run.report.read_text()
    assert f"tokens per {unit}" in page and "Replay protection" in page
