"""Document-level language identification, offline, as a datatrove filter.

Backends: py3langid (97 languages, its model ships in the PyPI package; the fastest), lingua (75 languages, models
in the package; slower, strong on short text), and any local fastText model (GlotLID's model_v3.bin, FineWeb2's
choice, or lid.176.bin). Every backend answers with a normalised language code (ISO 639-1 where one exists:
GlotLID's `vie_Latn` becomes `vi`) and its confidence in [0, 1].
"""

from __future__ import annotations

import csv
import os
from functools import lru_cache

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

from graftlm.curate.config import LanguageIdConfig

UNKNOWN = "und"


@lru_cache(maxsize=1)
def _iso639_3_to_1() -> dict[str, str]:
    """ISO 639-3 → 639-1 codes, from the language table datatrove ships for its word tokenizers."""
    from datatrove.utils._import_utils import ASSETS_PATH

    with open(os.path.join(ASSETS_PATH, "tokenizer_assignment.csv"), encoding="utf-8") as f:
        return {row["code_3"]: row["code_1"] for row in csv.DictReader(f) if row["code_1"]}


def normalize_language(code: str) -> str:
    """`__label__vie_Latn`, `vie`, `VI`, `vi-VN` → `vi`; a code without a two-letter form stays three letters."""
    code = code.removeprefix("__label__").replace("-", "_").split("_")[0].lower()
    return _iso639_3_to_1().get(code, code) if len(code) == 3 else code


class Py3langidIdentifier:
    def __init__(self) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self._model = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def __call__(self, text: str) -> tuple[str, float]:
        lang, confidence = self._model.classify(text)
        return normalize_language(lang), float(confidence)


class LinguaIdentifier:
    def __init__(self) -> None:
        from lingua import LanguageDetectorBuilder

        self._detector = LanguageDetectorBuilder.from_all_languages().build()

    def __call__(self, text: str) -> tuple[str, float]:
        ranked = self._detector.compute_language_confidence_values(text)
        if not ranked:  # no letters at all
            return UNKNOWN, 0.0
        best = ranked[0]
        return best.language.iso_code_639_1.name.lower(), float(best.value)


class FastTextIdentifier:
    def __init__(self, model_path: str) -> None:
        from fasttext.FastText import _FastText  # the class itself: load_model() prints a deprecation notice

        self._model = _FastText(model_path)

    def __call__(self, text: str) -> tuple[str, float]:
        labels, scores = self._model.predict(text.replace("\n", " "), k=1)  # fastText reads a single line
        if not labels:
            return UNKNOWN, 0.0
        return normalize_language(labels[0]), min(float(scores[0]), 1.0)


def make_identifier(config: LanguageIdConfig):
    if config.backend == "py3langid":
        return Py3langidIdentifier()
    if config.backend == "lingua":
        return LinguaIdentifier()
    return FastTextIdentifier(config.model)


def threshold_for(config: LanguageIdConfig, lang: str) -> float:
    """The minimum confidence for documents of `lang`: the recipe's for that language, else the default."""
    thresholds = {normalize_language(code): value for code, value in config.thresholds.items()}
    return thresholds.get(normalize_language(lang), config.default_threshold)


class LanguageIdFilter(BaseFilter):
    """Keeps a document when its most likely language is `target` with at least the target's threshold.

    Every document is labelled (`metadata.language`, `metadata.language_score`) and counted in the stats
    (`language_docs_<code>`, `language_bytes_<code>`), so the language distribution covers dropped documents too.
    Drop reasons: `lang_<code>` (another language) and `low_confidence` (the target, below the threshold).
    """

    name = "🌍 Language ID (graftlm)"

    def __init__(self, target: str, config: LanguageIdConfig, exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        self.target = normalize_language(target)
        self.config = config
        self.threshold = threshold_for(config, self.target)
        self._identify = None  # loaded in the worker process, on first use

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._identify is None:
            self._identify = make_identifier(self.config)
        lang, score = self._identify(doc.text[: self.config.max_chars])
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
        self.stat_update(f"language_docs_{lang}")
        self.stat_update(f"language_bytes_{lang}", value=len(doc.text.encode("utf-8")))
        if lang != self.target:
            return False, f"lang_{lang}"
        if score < self.threshold:
            return False, "low_confidence"
        return True
