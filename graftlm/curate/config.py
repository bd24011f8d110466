"""The `curate:` recipe section (see graftlm/curate/).

Thresholds left unset (null) take the curated language's default: FineWeb2's tuned values for it (any of its
1,929 languages, graftlm/curate/fineweb2.py), datatrove's FineWeb values for English and for languages FineWeb2 does
not have. A filter is switched off with `filters.<name>: false` (or `enabled: false`), a threshold check with 0
(datatrove's convention).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from graftlm.config import RecipePath, Section
from graftlm.curate.fineweb2 import MAX_REPETITIONS
from graftlm.languages import language

FINEWEB2_REHYDRATION = {1: 1, 2: 2, 3: 3, 5: 5, 100: 8, 1000: 1}
"""A FineWeb2-style upsampling for every language: a kept document whose duplicate cluster has at least `size`
members is written `times` times (largest `size` <= the cluster's); very large clusters (boilerplate) go back to 1.
`rehydrate: fineweb2` takes instead the weights FineWeb2 computed for the curated language."""


class LanguageIdConfig(Section):
    enabled: bool = True
    backend: Literal["py3langid", "lingua", "fasttext"] = "py3langid"
    """`py3langid` and `lingua` ship their models inside their PyPI packages; `fasttext` reads `model`."""
    model: RecipePath | None = None
    """A local fastText model file (GlotLID's model_v3.bin, FineWeb2's choice, or lid.176.bin); fasttext only."""
    thresholds: dict[str, float] = Field(default_factory=dict)
    """Minimum confidence per target language, e.g. {vi: 0.8}; a language not named here takes FineWeb2's
    `language_score` for it (the GlotLID confidence FineWeb2 required), else `default_threshold`."""
    default_threshold: float = Field(default=0.65, ge=0, le=1)
    """The minimum confidence of a language that neither `thresholds` nor FineWeb2 gives one."""
    max_chars: int = Field(default=10_000, ge=100)
    """Only the first characters of a document are classified: bounds the cost of very long documents."""

    @field_validator("thresholds")
    @classmethod
    def _probabilities(cls, thresholds: dict[str, float]) -> dict[str, float]:
        normalised: dict[str, float] = {}
        for lang, value in thresholds.items():
            if not 0 <= value <= 1:
                raise ValueError(f"threshold of '{lang}' must be between 0 and 1, got {value}")
            code = language(lang).code  # an unknown code is an error naming this key
            if code in normalised:
                raise ValueError(f"'{lang}' and another key both name {language(lang).name} ({code})")
            normalised[code] = value
        return normalised

    @model_validator(mode="after")
    def _model_for_fasttext(self) -> "LanguageIdConfig":
        if self.backend == "fasttext" and self.model is None:
            raise ValueError("backend fasttext needs `model`: the path of a fastText model file (e.g. GlotLID)")
        if self.backend != "fasttext" and self.model is not None:
            raise ValueError(f"`model` is only read by backend fasttext (backend is {self.backend})")
        return self


class _Switchable(Section):
    """A step that can be switched off; `name: false` / `name: true` in the recipe are short for `enabled`."""

    enabled: bool = True

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, data: Any) -> Any:
        return {"enabled": data} if isinstance(data, bool) else data


NGramThresholds = list[tuple[int, float]]


class GopherRepetitionConfig(_Switchable):
    """datatrove's GopherRepetitionFilter: repeated lines, paragraphs and n-grams (Gopher, Rae et al. 2021)."""

    dup_line_frac: float | None = None
    dup_para_frac: float | None = None
    dup_line_char_frac: float | None = None
    dup_para_char_frac: float | None = None
    top_n_grams: NGramThresholds | None = None
    """[[n, max fraction of characters in the most frequent n-gram], ...]"""
    dup_n_grams: NGramThresholds | None = None
    """[[n, max fraction of characters in duplicated n-grams], ...]"""


class GopherQualityConfig(_Switchable):
    """datatrove's GopherQualityFilter: document length, word length, symbols, bullets, stop words."""

    min_doc_words: int | None = None
    max_doc_words: int | None = None
    min_avg_word_length: float | None = None
    max_avg_word_length: float | None = None
    max_symbol_word_ratio: float | None = None
    max_bullet_lines_ratio: float | None = None
    max_ellipsis_lines_ratio: float | None = None
    max_non_alpha_words_ratio: float | None = None
    """Despite datatrove's name: the minimum fraction of words that contain a letter."""
    min_stop_words: int | None = None
    stop_words: list[str] | None = None
    """The language's most frequent words; a language without a default list skips the stop-word check."""


class FineWebQualityConfig(_Switchable):
    """datatrove's FineWebQualityFilter: lines ending in punctuation, short lines, duplicated lines, list-likeness."""

    line_punct_thr: float | None = None
    line_punct_exclude_zero: bool | None = None
    short_line_thr: float | None = None
    short_line_length: int | None = None
    char_duplicates_ratio: float | None = None
    new_line_ratio: float | None = None


class C4QualityConfig(_Switchable):
    """datatrove's C4QualityFilter: keeps lines ending in punctuation, drops pages with code or boilerplate.
    Off by default: FineWeb2 found that the C4 filters hurt multilingual data."""

    enabled: bool = False
    split_paragraph: bool | None = None
    remove_citations: bool | None = None
    filter_no_terminal_punct: bool | None = None
    min_num_sentences: int | None = None
    min_words_per_line: int | None = None
    max_word_length: int | None = None
    filter_lorem_ipsum: bool | None = None
    filter_javascript: bool | None = None
    filter_curly_bracket: bool | None = None
    filter_policy: bool | None = None


class FiltersConfig(Section):
    """Quality filters, applied in this order after language ID (FineWeb2's order, C4 last)."""

    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    fineweb_quality: FineWebQualityConfig = FineWebQualityConfig()
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    c4: C4QualityConfig = C4QualityConfig()


class MinhashSettings(_Switchable):
    """datatrove's MinHash near-duplicate removal (its four steps). The defaults catch copies that differ in ~5%
    of their words (5-gram Jaccard ~0.6); FineWeb's 14 buckets x 8 hashes only catch ~0.75 and above."""

    words: Literal["language", "whitespace"] = "language"
    """How text splits into the words of the n-grams: the language's word tokenizer (FineWeb2; Vietnamese: pyvi
    words), or spaces (Vietnamese: syllables; several times faster, wrong for scripts without spaces)."""
    n_grams: int = Field(default=5, ge=1)
    num_buckets: int = Field(default=20, ge=1)
    hashes_per_bucket: int = Field(default=3, ge=1)
    seed: int = 1


EXECUTOR_CLASSES = {"local": "LocalPipelineExecutor", "slurm": "SlurmPipelineExecutor", "ray": "RayPipelineExecutor"}
SET_BY_GRAFTLM = ("pipeline", "tasks", "workers", "logging_dir", "depends", "job_name", "skip_completed")


class CurateConfig(Section):
    sources: list[str] = []
    """Sources to curate; empty means every source that has a `lang`."""
    executor: Literal["local", "slurm", "ray"] = "local"
    """Which datatrove executor runs the pipeline: this machine, a Slurm cluster, or a Ray cluster."""
    workers: int = Field(default=2, ge=1)
    """Tasks that run at once (local: processes)."""
    tasks: int | None = Field(default=None, ge=1)
    """Shards of the input; default: `workers`."""
    executor_options: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    """Passed to the executor as they are, e.g. slurm: {partition: cpu, time: '2:00:00', mem_per_cpu_gb: 4}."""
    submit: bool = True
    """slurm: submit the jobs. false writes their sbatch scripts and a submit.sh into curated/.work/<source>/slurm/
    without submitting anything (to read them, or to submit them by hand)."""
    language_id: LanguageIdConfig = LanguageIdConfig()
    filters: FiltersConfig = FiltersConfig()
    minhash: MinhashSettings = MinhashSettings()
    rehydrate: Literal["fineweb2"] | dict[int, int] | None = Field(default_factory=lambda: dict(FINEWEB2_REHYDRATION))
    """{min cluster size: times written}; `fineweb2`: FineWeb2's weights for the curated language (up to
    `max_repetitions` times); null writes each kept document once."""
    max_repetitions: int = Field(default=5, ge=min(MAX_REPETITIONS), le=max(MAX_REPETITIONS))
    """With `rehydrate: fineweb2`: FineWeb2's weights for at most this many copies of a document (3 to 10, the
    tables FineWeb2 published; its own experiments used 10)."""

    @field_validator("rehydrate", mode="before")
    @classmethod
    def _table_or_fineweb2(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "fineweb2":
            raise ValueError(f"expected a table {{cluster size: times}}, `fineweb2` or null, got {value!r}")
        return value

    @field_validator("rehydrate")
    @classmethod
    def _rehydration_table(cls, table: dict[int, int] | str | None) -> dict[int, int] | str | None:
        if table is None or isinstance(table, str):
            return table
        if 1 not in table:
            raise ValueError("must give the times for cluster size 1 (documents without duplicates)")
        for size, times in table.items():
            if size < 1 or times < 0:
                raise ValueError(f"cluster sizes must be >= 1 and times >= 0, got {size}: {times}")
        return dict(sorted(table.items()))

    @field_validator("submit")
    @classmethod
    def _submit_is_slurm(cls, submit: bool, info: ValidationInfo) -> bool:
        if not submit and info.data.get("executor") != "slurm":
            raise ValueError("only the slurm executor submits jobs (executor is "
                             f"{info.data.get('executor', 'local')})")
        return submit

    @field_validator("executor_options")
    @classmethod
    def _executor_options_exist(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        executor = info.data.get("executor", "local")
        if not options and executor == "local":
            return options
        import datatrove.executor as executors

        executor_class = getattr(executors, EXECUTOR_CLASSES[executor])
        parameters = inspect.signature(executor_class.__init__).parameters
        settings = {name: p for name, p in parameters.items() if name not in SET_BY_GRAFTLM + ("self",)}
        for key in options:
            if key in SET_BY_GRAFTLM:
                raise ValueError(f"'{key}' is set by graftlm (see curate.workers and curate.tasks)")
            if key not in settings:
                raise ValueError(f"'{key}' is not a setting of datatrove's {executor_class.__name__} "
                                 f"(settings: {', '.join(settings)})")
        for name, parameter in settings.items():
            if parameter.default is inspect.Parameter.empty and name not in options:
                raise ValueError(f"'{name}' is required by the {executor} executor")
        return options
