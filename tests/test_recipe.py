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
