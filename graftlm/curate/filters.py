"""Quality filters with the curated language's word splitting and thresholds.

A threshold comes from, in order: the recipe (`curate.filters.<filter>.<key>`), the language's defaults below,
datatrove's own default (FineWeb English). Words are split by datatrove's tokenizer for the language (Vietnamese:
spaCy + pyvi, which joins the syllables of a word: `thành phố` is one word), so word counts and n-grams mean the
same thing in every language.
"""

from __future__ import annotations

from typing import Callable

from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.word_tokenizers import WordTokenizer, load_word_tokenizer, strip_strings

from graftlm.curate.config import FiltersConfig

# FineWeb2's changes for every non-English language: no paragraph checks (extracted web text has none), no
# short-line check, 10x looser duplicated-line characters.
_FINEWEB2_MULTILINGUAL = {
    "gopher_repetition": {"dup_para_frac": 0, "dup_line_char_frac": 0, "dup_para_char_frac": 0},
    "fineweb_quality": {"short_line_thr": 999, "char_duplicates_ratio": 0.1},
}

# FineWeb2's thresholds and stop words tuned per language (github.com/huggingface/fineweb-2, configs/<lang>.yml).
_FINEWEB2_TUNED = {
    "vi": {
        "gopher_repetition": {
            "dup_line_frac": 0.293,
            "top_n_grams": [(2, 0.223), (3, 0.197), (4, 0.171)],
            "dup_n_grams": [(5, 0.178), (6, 0.163), (7, 0.15), (8, 0.136), (9, 0.124), (10, 0.111)],
        },
        "fineweb_quality": {"line_punct_thr": 0.333, "new_line_ratio": 0.103},
        "gopher_quality": {
            "min_avg_word_length": 3, "max_avg_word_length": 11, "max_non_alpha_words_ratio": 0.803,
            "stop_words": ["là", "và", "của", "một", "được", "trong", "năm", "các", "có", "loài", "này", "đã",
                           "người"],
        },
    },
    "id": {
        "gopher_repetition": {
            "dup_line_frac": 0.25,
            "top_n_grams": [(2, 0.088), (3, 0.104), (4, 0.12)],
            "dup_n_grams": [(5, 0.176), (6, 0.158), (7, 0.142), (8, 0.128), (9, 0.119), (10, 0.109)],
        },
        "fineweb_quality": {"line_punct_thr": 0.25, "new_line_ratio": 0.222},
        "gopher_quality": {
            "min_avg_word_length": 3, "max_avg_word_length": 11, "max_non_alpha_words_ratio": 0.805,
            "stop_words": ["dan", "yang", "di", "pada", "dari", "ini", "dengan", "adalah", "untuk", "dalam"],
        },
    },
}

FILTER_CLASSES: dict[str, type[BaseFilter]] = {
    "gopher_repetition": GopherRepetitionFilter,
    "fineweb_quality": FineWebQualityFilter,
    "gopher_quality": GopherQualityFilter,
    "c4": C4QualityFilter,
}


class VietnameseWords(WordTokenizer):
    """datatrove's Vietnamese words (spaCy's Vietnamese tokenizer with pyvi) without building a spaCy document
    around them: the same words, in ~40% less time, and word splitting is most of the filters' cost."""

    def __init__(self):
        super().__init__("vi")

    @property
    def _datatrove(self) -> WordTokenizer:
        return load_word_tokenizer("vi")

    def word_tokenize(self, text: str) -> list[str]:
        return strip_strings(self._datatrove.tokenizer.tokenizer.pyvi_tokenize(text))

    def sent_tokenize(self, text: str) -> list[str]:
        return self._datatrove.sent_tokenize(text)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return self._datatrove.span_tokenize(text)


def word_splitter(lang: str) -> str | WordTokenizer:
    """What datatrove's steps get as `language`: a code (datatrove picks the tokenizer) or a tokenizer. One object
    for all the filters of a pipeline, so that datatrove's cache splits each document once."""
    return VietnameseWords() if lang == "vi" else lang


def language_defaults(lang: str, filter_name: str) -> dict:
    """The thresholds a language uses for a filter when the recipe leaves them unset."""
    if lang == "en":
        return {}  # datatrove's defaults are FineWeb's English ones
    return {**_FINEWEB2_MULTILINGUAL.get(filter_name, {}), **_FINEWEB2_TUNED.get(lang, {}).get(filter_name, {})}


def filter_settings(config: FiltersConfig, lang: str, filter_name: str) -> dict:
    """The keyword arguments of a filter's datatrove class for a language: language defaults, then the recipe."""
    recipe = getattr(config, filter_name).model_dump(exclude={"enabled"}, exclude_none=True)
    settings = {**language_defaults(lang, filter_name), **recipe}
    if filter_name == "gopher_quality" and lang != "en" and "stop_words" not in settings:
        settings.setdefault("min_stop_words", 0)  # datatrove's stop words are English: no list, no check
    return settings


def quality_filters(config: FiltersConfig, lang: str,
                    exclusion_writer: Callable[[str], DiskWriter]) -> list[tuple[str, BaseFilter]]:
    """The enabled filters in order, each with its name and a writer for the documents it drops."""
    steps, words = [], word_splitter(lang)
    for name, filter_class in FILTER_CLASSES.items():
        if getattr(config, name).enabled:
            step = filter_class(language=words, exclusion_writer=exclusion_writer(name),
                                **filter_settings(config, lang, name))
            steps.append((name, step))
    return steps
