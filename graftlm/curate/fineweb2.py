"""FineWeb2's settings for a language: filter thresholds, stop words, language-ID score, rehydration weights.

FineWeb2 tuned each of its 1,929 languages (configs/<iso639-3>_<Script>.yml in github.com/huggingface/fineweb-2);
the values ship with graftlm in graftlm/assets/fineweb2/ (Apache-2.0, see the README there). English is not among
them: FineWeb2 is FineWeb's non-English part, and English keeps datatrove's defaults, which are FineWeb's.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources

from graftlm.languages import language

MAX_REPETITIONS = range(3, 11)
"""The maximum repetition counts FineWeb2 published rehydration weights for."""

MULTILINGUAL = {
    "gopher_repetition": {"dup_para_frac": 0, "dup_line_char_frac": 0, "dup_para_char_frac": 0},
    "fineweb_quality": {"short_line_thr": 999, "char_duplicates_ratio": 0.1},
    "gopher_quality": {"min_stop_words": 2},
}
"""What FineWeb2's pipeline (fineweb-2-pipeline.py) sets the same way for every language: no paragraph checks
(extracted web text has none), no short-line check, 10x looser duplicated-line characters, two stop words."""


def _asset(name: str):
    with resources.files("graftlm").joinpath(f"assets/fineweb2/{name}").open("rb") as f:
        return json.loads(gzip.decompress(f.read()))


@lru_cache(maxsize=1)
def configs() -> dict[str, dict]:
    """Every FineWeb2 config, by FineWeb2 name (`vie_Latn`)."""
    return _asset("configs.json.gz")


@lru_cache(maxsize=1)
def _rehydration() -> dict[str, dict[str, dict[str, int]]]:
    return _asset("rehydration.json.gz")


def config_for(lang: str) -> dict | None:
    """The FineWeb2 config of a language (any code `graftlm.languages` knows), None when FineWeb2 has none."""
    return configs().get(language(lang).fineweb2)


def filter_defaults(lang: str, filter_name: str) -> dict:
    """The keyword arguments FineWeb2 gives a datatrove filter for a language ({} for English: datatrove's own)."""
    if language(lang).code == "en":
        return {}
    config = config_for(lang)
    settings = dict(MULTILINGUAL.get(filter_name, {}))
    if config is None:
        return settings
    if filter_name == "gopher_repetition":
        settings.update(dup_line_frac=config["dup_line_frac"],
                        top_n_grams=[tuple(pair) for pair in config["top_n_grams"]],
                        dup_n_grams=[tuple(pair) for pair in config["dup_n_grams"]])
    elif filter_name == "fineweb_quality":
        settings.update(line_punct_thr=config["line_punct_thr"], new_line_ratio=config["new_line_ratio"])
    elif filter_name == "gopher_quality":
        settings.update(min_avg_word_length=config["min_avg_word_length"],
                        max_avg_word_length=config["max_avg_word_length"],
                        max_non_alpha_words_ratio=config["max_non_alpha_words_ratio"],
                        stop_words=list(config["stopwords"]))
    return settings


def language_score(lang: str) -> float | None:
    """The language-ID confidence FineWeb2 required for the language (GlotLID's), None when it has no config."""
    config = config_for(lang)
    return None if config is None else float(config["language_score"])


def rehydration_weights(lang: str, max_repetitions: int) -> dict[int, int] | None:
    """FineWeb2's {min cluster size: times written} for a language, None when FineWeb2 has no weights for it."""
    table = _rehydration()[str(max_repetitions)].get(language(lang).fineweb2)
    return None if table is None else dict(sorted((int(size), int(times)) for size, times in table.items()))
