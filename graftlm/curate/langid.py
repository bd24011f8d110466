"""Document-level language identification, offline, as a datatrove filter.

Backends: py3langid (97 languages, its model ships in the PyPI package; the fastest), lingua (75 languages, models
in the package; slower, strong on short text), and any local fastText model (GlotLID's model_v3.bin, FineWeb2's
choice, covers its 1,929 languages; or lid.176.bin). Every backend answers with a canonical language code
(graftlm/languages.py: GlotLID's `vie_Latn` becomes `vi`, `cmn_Hani` becomes `zh`) and its confidence in [0, 1].
A backend that cannot name the curated language is refused before any work (`check_backend_knows`).
"""

from __future__ import annotations

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

from graftlm.curate.config import LanguageIdConfig
from graftlm.curate.fineweb2 import language_score
from graftlm.errors import RecipeError
from graftlm.languages import label_language, language, normalize_language

UNKNOWN = "und"


class Py3langidIdentifier:
    def __init__(self) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self._model = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def __call__(self, text: str) -> tuple[str, float]:
        lang, confidence = self._model.classify(text)
        return label_language(lang), float(confidence)

    def labels(self) -> list[str]:
        return list(self._model.nb_classes)


class LinguaIdentifier:
    def __init__(self) -> None:
        from lingua import LanguageDetectorBuilder

        self._detector = LanguageDetectorBuilder.from_all_languages().build()

    def __call__(self, text: str) -> tuple[str, float]:
        ranked = self._detector.compute_language_confidence_values(text)
        if not ranked:  # no letters at all
            return UNKNOWN, 0.0
        best = ranked[0]
        return label_language(best.language.iso_code_639_1.name), float(best.value)

    @staticmethod
    def labels() -> list[str]:
        from lingua import Language

        return [lang.iso_code_639_1.name for lang in Language.all()]


class FastTextIdentifier:
    def __init__(self, model_path: str) -> None:
        from fasttext.FastText import _FastText  # the class itself: load_model() prints a deprecation notice

        self._model = _FastText(model_path)

    def __call__(self, text: str) -> tuple[str, float]:
        labels, scores = self._model.predict(text.replace("\n", " "), k=1)  # fastText reads a single line
        if not labels:
            return UNKNOWN, 0.0
        return label_language(labels[0]), min(float(scores[0]), 1.0)

    def labels(self) -> list[str]:
        return list(self._model.get_labels())


def make_identifier(config: LanguageIdConfig):
    if config.backend == "py3langid":
        return Py3langidIdentifier()
    if config.backend == "lingua":
        return LinguaIdentifier()
    return FastTextIdentifier(config.model)


def threshold_for(config: LanguageIdConfig, lang: str) -> float:
    """The minimum confidence for documents of `lang`: the recipe's for that language, else FineWeb2's
    `language_score` for it, else `default_threshold`."""
    code = normalize_language(lang)
    if code in config.thresholds:
        return config.thresholds[code]
    score = language_score(code)
    return config.default_threshold if score is None else score


def check_backend_knows(config: LanguageIdConfig, lang: str) -> None:
    """A RecipeError, naming the languages the backend knows, when it cannot answer `lang` for any document (every
    document would be dropped as another language)."""
    known = sorted({label_language(label) for label in make_identifier(config).labels()})
    target = language(lang)
    if target.code in known:
        return
    hint = ("" if config.backend == "fasttext" else
            "; for other languages use backend: fasttext with a GlotLID model (model: path/to/model_v3.bin from "
            "huggingface.co/cis-lmu/glotlid: FineWeb2's choice, covers its 1,929 languages)")
    raise RecipeError(f"curate.language_id.backend: {config.backend} does not know {target.name} ({target.code}); "
                      f"it knows {len(known)} languages: {', '.join(known)}{hint}")


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
