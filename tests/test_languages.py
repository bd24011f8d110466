"""Language codes normalised once (graftlm/languages.py) and FineWeb2's settings shipped with the package."""

import gzip
import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from graftlm.errors import GraftError, RecipeError
from graftlm.languages import (UnknownLanguage, fertility_unit, label_language, language, normalize_language,
                               same_language)
from graftlm.recipe import validate_recipe

SHARED_FINEWEB2 = REPO.parent / "shared/data/fineweb2"


@pytest.mark.parametrize("codes, canonical, fineweb2", [
    (["sw", "swa", "swh", "swh_Latn", "SW", "sw-KE", "__label__swh_Latn"], "sw", "swh_Latn"),
    (["vi", "vie", "vie_Latn", "VI", "vi-VN"], "vi", "vie_Latn"),
    (["zh", "zho", "chi", "cmn", "cmn_Hani", "zho_Hans", "zh-Hant-TW", "__label__cmn_Hani"], "zh", "cmn_Hani"),
    (["id", "ind", "ind_Latn", "in"], "id", "ind_Latn"),
    (["ru", "rus", "rus_Cyrl"], "ru", "rus_Cyrl"),
    (["ar", "ara", "arb", "arb_Arab"], "ar", "arb_Arab"),
    (["en", "eng", "eng_Latn"], "en", "eng_Latn"),
    (["de", "deu", "ger"], "de", "deu_Latn"),
])
def test_every_spelling_of_a_language_is_one_code(codes, canonical, fineweb2):
    assert {normalize_language(code) for code in codes} == {canonical}
    assert language(codes[-1]).fineweb2 == fineweb2
    assert all(same_language(code, codes[0]) for code in codes)
    assert normalize_language(canonical) == canonical  # idempotent: a resolved recipe validates again


def test_members_of_a_macrolanguage_stay_themselves():
    assert normalize_language("yue") == "yue" and not same_language("yue", "zh")  # Cantonese is not Mandarin
    assert normalize_language("swc") == "swc" and not same_language("swc", "sw")  # nor Congo Swahili Swahili
    assert normalize_language("sr") == "sr" and normalize_language("srp_Latn") == "sr_Latn"  # another script
    assert not same_language("sr", "sr_Latn")


def test_scripts_and_fertility_units():
    assert [fertility_unit(c) for c in ("vi", "en", "ru", "id", "ko")] == ["word"] * 5
    assert [fertility_unit(c) for c in ("zh", "zho_Hans", "ja", "th", "km", "my", "lo")] == ["character"] * 7
    assert fertility_unit("my-own-set") == "word"  # a set name that is no language: words
    assert language("ja").script == "Jpan" and language("zh-Hant").script == "Hani"


@pytest.mark.parametrize("code, message", [
    ("qqq", "unknown language code 'qqq' (ISO 639-1 such as sw, ISO 639-3 such as swh, or FineWeb2's swh_Latn)"),
    ("swahili", "unknown language code 'swahili'; did you mean sw (Swahili (individual language))?"),
    ("und", "unknown language code 'und'"),
    ("vie_Cyrl", "'vie_Cyrl': Vietnamese is not known in the script Cyrl (known: Latn)"),
])
def test_a_made_up_code_is_a_clear_error(code, message):
    with pytest.raises(UnknownLanguage) as error:
        normalize_language(code)
    assert str(error.value).startswith(message) and isinstance(error.value, GraftError)


def test_identifier_labels_are_kept_when_unknown():
    assert label_language("__label__cmn_Hani") == "zh" and label_language("__label__xyz_Zzzz") == "xyz_zzzz"


def test_the_recipe_holds_normalised_codes_and_names_the_key_of_a_bad_one():
    recipe = validate_recipe({
        "name": "x", "sources": {"t": {"paths": ["a.jsonl"], "lang": "swh_Latn"}, "en": {"paths": ["b.jsonl"]}},
        "curate": {"language_id": {"thresholds": {"swa": 0.7}}},
        "eval": {"choice": {"c": {"path": "c.jsonl", "lang": "swh"}}}})
    assert recipe.sources["t"].lang == "sw" and recipe.curate.language_id.thresholds == {"sw": 0.7}
    assert recipe.eval.choice["c"].lang == "sw"
    for data, key in [({"sources": {"t": {"paths": ["a"], "lang": "klingonese"}}}, "sources.t.lang"),
                      ({"sources": {"t": {"paths": ["a"], "lang": "sw"}},
                        "curate": {"language_id": {"thresholds": {"xx": 0.5}}}}, "curate.language_id.thresholds"),
                      ({"sources": {"t": {"paths": ["a"], "lang": "sw"}},
                        "curate": {"language_id": {"thresholds": {"sw": 0.5, "swh": 0.6}}}},
                       "curate.language_id.thresholds"),
                      ({"sources": {"t": {"paths": ["a"], "lang": "sw"}},
                        "eval": {"choice": {"c": {"path": "c", "lang": "qq"}}}}, "eval.choice.c.lang")]:
        with pytest.raises(RecipeError) as error:
            validate_recipe({"name": "x", **data})
        assert str(error.value).startswith(f"{key}: "), str(error.value)


def test_xcopa_connectives_are_keyed_by_canonical_codes():
    from graftlm.evaluate.choice import XCOPA_CONNECTIVES

    assert all(normalize_language(code) == code for code in XCOPA_CONNECTIVES)


# ---- FineWeb2's settings, shipped as package data ----------------------------------------------------------


def packaged(name: str):
    return json.loads(gzip.decompress((REPO / "graftlm/assets/fineweb2" / name).read_bytes()))


def test_every_fineweb2_config_parses_and_names_a_known_language():
    from graftlm.curate.fineweb2 import configs

    shipped = configs()
    assert len(shipped) == 1929
    for name, config in shipped.items():
        assert language(name).fineweb2 == name, name
        assert set(config) == {"dup_line_frac", "dup_n_grams", "top_n_grams", "line_punct_thr", "new_line_ratio",
                               "min_avg_word_length", "max_avg_word_length", "max_non_alpha_words_ratio",
                               "stopwords", "language_score"}, name
        assert all(len(pair) == 2 and isinstance(pair[0], int) for pair in config["dup_n_grams"] + config["top_n_grams"])
        assert config["stopwords"] and 0 < config["language_score"] <= 1


@pytest.mark.skipif(not SHARED_FINEWEB2.is_dir(), reason="the shared FineWeb2 files are not on this machine")
def test_the_shipped_settings_are_fineweb2_s_unchanged():
    configs = packaged("configs.json.gz")
    for path in sorted((SHARED_FINEWEB2 / "configs").glob("*.yml")):
        assert configs.pop(path.stem) == yaml.safe_load(path.read_text(encoding="utf-8")), path.name
    assert not configs
    weights = packaged("rehydration.json.gz")
    for n in range(3, 11):
        source = json.loads((SHARED_FINEWEB2 / f"rehydration/weights/up_to_{n:02d}_reps.json").read_text())
        assert weights[str(n)] == source
    assert (REPO / "graftlm/assets/fineweb2/LICENSE").read_text() == (SHARED_FINEWEB2 / "LICENSE").read_text()


def test_the_package_data_is_declared():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'graftlm = ["assets/fineweb2/*"]' in pyproject
    assert {p.name for p in Path(REPO / "graftlm/assets/fineweb2").iterdir()} >= {
        "configs.json.gz", "rehydration.json.gz", "LICENSE", "README.md"}
