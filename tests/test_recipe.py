from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_graft
from graftlm.errors import RecipeError
from graftlm.recipe import load_recipe


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


MINIMAL = "name: t\nsources:\n  vi: {paths: [data/*.jsonl]}\n"


def test_demo_recipe_loads_with_defaults_written_out():
    recipe = load_recipe(REPO / "recipes/demo-vi.yaml")
    assert recipe.name == "demo-vi" and recipe.base_model == "smollm2-135m"
    assert recipe.mixture_weights() == {"vi": 0.75, "en": 0.25}
    dumped = yaml.safe_load(recipe.to_yaml())
    assert dumped["mixture"] == {"vi": 0.75, "en": 0.25, "repeat": True}
    assert dumped["sources"]["vi"]["on_error"] == "stop"  # a default, written out
    assert Path(dumped["sources"]["vi"]["paths"][0]).is_absolute()


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, MINIMAL))
    assert recipe.sources["vi"].paths == [str(tmp_path / "data/*.jsonl")]


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(REPO / "recipes/demo-vi.yaml")
    again = load_recipe(write_recipe(tmp_path, recipe.to_yaml()))
    assert again == recipe


@pytest.mark.parametrize("override, message", [
    ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("train.lrr=1", "train.lrr: unknown key (did you mean 'lr'?)"),
    ("train.seq_len=2.5", "train.seq_len: expected an integer, got 2.5"),
    ("train.seq_len=-4", "train.seq_len: input should be greater than or equal to 8, got -4"),
    ("sources.vi.on_error=ignore", "sources.vi.on_error: expected one of 'stop' or 'skip', got 'ignore'"),
    ("sources.vi.paths=data.jsonl", "sources.vi.paths: expected a list, got 'data.jsonl'"),
    ("mixture.fr=1", "mixture.fr: not a source (sources: vi)"),
    ("mixture.vi=x", "mixture.vi: expected a number, got 'x'"),
    ("name=a b", "name: must be letters, digits"),
    ("train", "--set train: expected key=value"),
])
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path, MINIMAL), [override])
    assert str(e.value).startswith(message)


def test_missing_key_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="^sources: required key missing$"):
        load_recipe(write_recipe(tmp_path, "name: t\n"))
    with pytest.raises(RecipeError, match=r"recipe.yaml:2: invalid YAML: mapping values are not allowed here"):
        load_recipe(write_recipe(tmp_path, "name: t\nfoo: bar: baz\n"))
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_set_nested_values(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, MINIMAL), ["train.lr=1e-4", "sources.vi.lang=vi", "mixture.vi=2"])
    assert recipe.train.lr == 1e-4 and recipe.sources["vi"].lang == "vi"
    assert recipe.mixture_weights() == {"vi": 2.0}


def test_cli_error_is_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys):
    path = write_recipe(tmp_path, MINIMAL + "train: {lr: fast}\n")
    code, out, err = run_graft(monkeypatch, capsys, "recipe", "show", str(path))
    assert code == 2 and out == ""
    assert err.strip() == "error: train.lr: expected a number, got 'fast'"


def test_recipe_show_prints_resolved_yaml(tmp_path, monkeypatch, capsys):
    code, out, _ = run_graft(monkeypatch, capsys, "recipe", "show", str(write_recipe(tmp_path, MINIMAL)),
                             "--set", "train.seed=7")
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["train"]["seed"] == 7 and shown["base_model"] == "smollm2-135m"


def test_a_recipe_extends_another(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base/parent.yaml").write_text(MINIMAL + "train: {lr: 1.0e-4, seed: 3}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base/parent.yaml\nname: child\ntrain: {seed: 5}\nsources:\n  en: {paths: [e.txt]}\n")
    recipe = load_recipe(child)
    assert recipe.name == "child" and recipe.train.lr == 1e-4 and recipe.train.seed == 5  # merged key by key
    assert recipe.sources["vi"].paths == [str(tmp_path / "base/data/*.jsonl")]  # against the parent's folder
    assert recipe.sources["en"].paths == [str(tmp_path / "e.txt")]  # against the child's
    (tmp_path / "base/parent.yaml").write_text("extends: ../child.yaml\n")
    with pytest.raises(RecipeError, match="makes a cycle"):
        load_recipe(child)


def test_bundled_recipes_load():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        assert load_recipe(path).name == path.stem


# ---- one target language --------------------------------------------------------------------------------------

def _mixed(mixture: dict, langs: dict, **extra):
    from graftlm.recipe import validate_recipe

    data = REPO / "data/en/debian_handbook.jsonl"
    return validate_recipe({"name": "t", "sources": {n: {"paths": [str(data)], **({"lang": lang} if lang else {})}
                                                     for n, lang in langs.items()},
                            "mixture": mixture, "curate": {}, "vocab": {}, "train": {"distill": {}}, **extra})


def test_target_language_is_not_the_heaviest_source_but_the_language_besides_english():
    from graftlm.report.verdict import compute_verdict

    recipe = _mixed({"vi": 0.4, "en": 0.6}, {"vi": "vi", "en": "en"},
                    eval={"text": {"vi": str(REPO / "data/eval/sib200/vie_Latn/dev.tsv"),
                                   "en": str(REPO / "data/eval/sib200/eng_Latn/dev.tsv")}})
    assert recipe.target_language == "vi"
    assert recipe.vocab_source() == "vi"  # the vocabulary grows for Vietnamese,
    assert recipe.replay_sources() == ["en"]  # distillation runs on English,
    assert recipe.curated_sources() == ["vi"]  # curation cleans the Vietnamese,
    records = [{"step": s, "eval": {"text": {"vi": {"bpb": 2.0 - s}, "en": {"bpb": 1.3}}, "choice": {}}}
               for s in (0, 1)]
    roles = {c.name: c.role for c in compute_verdict(recipe, records).changes}
    assert roles == {"vi": "target", "en": "source"}  # and the verdict calls Vietnamese the target


def test_an_ambiguous_target_asks_for_target_and_target_settles_it():
    langs = {"vi": "vi", "id": "id", "en": "en", "code": None}
    with pytest.raises(RecipeError, match=r"^target: the mixture holds several languages besides en \(id, vi\)"):
        _mixed({"vi": 0.3, "id": 0.3, "en": 0.4}, langs)
    recipe = _mixed({"vi": 0.3, "id": 0.3, "en": 0.4, "code": 0.1}, langs, target="id")
    assert recipe.target_language == "id" and recipe.replay_sources() == ["vi", "en", "code"]
    assert _mixed({"vi": 0.7, "en": 0.2, "code": 0.1}, langs).target_language == "vi"  # code has no lang
    assert _mixed({"en": 1.0}, {"en": "en"}).target_language == "en"  # English domain adaptation
    with pytest.raises(RecipeError, match="^target: 'xx' is not the language of any source"):
        _mixed({"vi": 1.0}, {"vi": "vi"}, target="xx")
