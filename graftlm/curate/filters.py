"""Quality filters with the curated language's word splitting and thresholds.

A threshold comes from, in order: the recipe (`curate.filters.<filter>.<key>`), FineWeb2's value for the language
(graftlm/curate/fineweb2.py: thresholds and stop words tuned for each of its 1,929 languages), datatrove's own
default (FineWeb English). Words are split by the tokenizer datatrove assigns the language (Vietnamese: spaCy +
pyvi, which joins the syllables of a word: `thành phố` is one word; Chinese: jieba), so word counts and n-grams
mean the same thing in every language.
"""

from __future__ import annotations

from typing import Callable

from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.word_tokenizers import WordTokenizer, load_word_tokenizer, strip_strings

from graftlm.curate.config import FiltersConfig
from graftlm.curate.fineweb2 import filter_defaults
from graftlm.languages import language

FILTER_CLASSES: dict[str, type[BaseFilter]] = {
    "gopher_repetition": GopherRepetitionFilter,
    "fineweb_quality": FineWebQualityFilter,
    "gopher_quality": GopherQualityFilter,
    "c4": C4QualityFilter,
}


class LanguageWords(WordTokenizer):
    """The word tokenizer datatrove assigns a language (by its FineWeb2 name, e.g. `cmn_Hani`: spaCy with jieba),
    loaded in the process that uses it. It holds only the name, so that datatrove can copy a pipeline that holds
    it (an in-process run deep-copies each task's pipeline; a loaded jieba or spaCy object cannot be copied)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key

    @property
    def _datatrove(self) -> WordTokenizer:
        return load_word_tokenizer(self.key)

    def word_tokenize(self, text: str) -> list[str]:
        return self._datatrove.word_tokenize(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return self._datatrove.sent_tokenize(text)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return self._datatrove.span_tokenize(text)


class VietnameseWords(LanguageWords):
    """datatrove's Vietnamese words (spaCy's Vietnamese tokenizer with pyvi) without building a spaCy document
    around them: the same words, in ~40% less time, and word splitting is most of the filters' cost."""

    def __init__(self):
        super().__init__("vie_Latn")

    def word_tokenize(self, text: str) -> list[str]:
        return strip_strings(self._datatrove.tokenizer.tokenizer.pyvi_tokenize(text))


def word_splitter(lang: str) -> WordTokenizer:
    """What datatrove's steps get as `language`: the tokenizer datatrove assigns the language. One object for all
    the filters of a pipeline, so that datatrove's cache splits each document once."""
    found = language(lang)
    return VietnameseWords() if found.code == "vi" else LanguageWords(found.fineweb2)


def filter_settings(config: FiltersConfig, lang: str, filter_name: str) -> dict:
    """The keyword arguments of a filter's datatrove class for a language: FineWeb2's for it, then the recipe."""
    recipe = getattr(config, filter_name).model_dump(exclude={"enabled"}, exclude_none=True)
    settings = {**filter_defaults(lang, filter_name), **recipe}
    if filter_name == "gopher_quality" and "stop_words" not in settings and language(lang).code != "en" \
            and "min_stop_words" not in recipe:
        settings["min_stop_words"] = 0  # datatrove's stop words are English: without the language's, no check
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
