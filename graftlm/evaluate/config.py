"""The `eval:` recipe section: held-out text and multiple-choice sets per language, lm-evaluation-harness tasks,
generations, the logit lens, and when to evaluate them."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from graftlm.config import LanguageCode, RecipePath, Section
from graftlm.curate.config import LanguageIdConfig

LOCAL_TASKS = ("xcopa", "sib200", "bpb")
"""The lm-evaluation-harness tasks graftlm ships (graftlm/evaluate/tasks/), each read from a local file."""
_LANG = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class ChoiceSetConfig(Section):
    """A multiple-choice set: `{path: .., format: .., lang: ..}`, or just its path."""

    path: RecipePath
    format: Literal["auto", "xcopa", "generic"] = "auto"
    """`xcopa` (premise, choice1, choice2, question, label), `generic` (context, choices, label), or `auto`."""
    lang: LanguageCode | None = None
    """The set's language (XCOPA: that of its connectives, `vi`: "bởi vì"/"vì vậy"); detected from the premises
    when absent."""

    @model_validator(mode="before")
    @classmethod
    def _path_alone(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data


class HarnessTask(Section):
    """One lm-evaluation-harness task: `xcopa:vi=PATH` (a shipped local task, its language and file), or any task
    name lm-eval knows (`hellaswag`, or one in `include_path`). The mapping form `{task, lang, path, name}` is the
    same thing spelled out."""

    task: str
    """`xcopa` (XCOPA .jsonl), `sib200` (a SIB-200 .tsv: topic classification as multiple choice), `bpb` (bits per
    byte of a text file, loglikelihood_rolling), or an lm-eval task / group name."""
    lang: str | None = None
    """The language of a shipped task's file (XCOPA: picks the connectives, as lm-eval's own xcopa task has them)."""
    path: RecipePath | None = None
    """The file a shipped task reads: .jsonl for xcopa; .tsv (`text` and `category` columns) for sib200; .txt (a
    document a line), .tsv or .jsonl (`eval.text_field`) for bpb."""
    name: str | None = None
    """The task's name in the results (default: `graft_<task>_<lang>` for shipped tasks, else the task itself)."""

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        """`xcopa:vi=data/xcopa/test.vi.jsonl` -> {task: xcopa, lang: vi, path: ...}; `hellaswag` -> {task: ..}."""
        if not isinstance(data, str):
            return data
        task, colon, rest = data.partition(":")
        if not colon:
            return {"task": data}
        lang, equals, path = rest.partition("=")
        if not equals or not path:
            raise ValueError(f"expected TASK:LANG=PATH (e.g. xcopa:vi=test.vi.jsonl) or a task name, got {data!r}")
        return {"task": task, "lang": lang, "path": path}

    @model_validator(mode="after")
    def _local_tasks_need_a_file(self) -> "HarnessTask":
        if self.task in LOCAL_TASKS:
            if self.lang is None or self.path is None:
                raise ValueError(f"task {self.task} reads a local file: give it as {self.task}:LANG=PATH")
            if not _LANG.match(self.lang):
                raise ValueError(f"language {self.lang!r} is not a language code such as vi or zh_Hans")
            if self.task == "xcopa":
                from graftlm.evaluate.choice import XCOPA_CONNECTIVES

                if self.lang not in XCOPA_CONNECTIVES:
                    raise ValueError(f"xcopa: no connectives for language '{self.lang}' "
                                     f"(known: {', '.join(sorted(XCOPA_CONNECTIVES))})")
        elif self.lang is not None or self.path is not None:
            raise ValueError(f"task {self.task!r} is not one of graftlm's local tasks ({', '.join(LOCAL_TASKS)}): "
                             "it takes no language or path (lm-eval reads its own data)")
        return self

    @property
    def result_name(self) -> str:
        if self.name:
            return self.name
        return f"graft_{self.task}_{self.lang}" if self.task in LOCAL_TASKS else self.task


class HarnessConfig(Section):
    """lm-evaluation-harness run in process on the model being trained (`lm-eval` package), offline."""

    tasks: list[HarnessTask] = []
    """Tasks to run (empty: none): `xcopa:vi=PATH`, `sib200:vi=PATH`, `bpb:vi=PATH`, or lm-eval task names whose
    data is local (graftlm never downloads: a task that needs the hub is an error)."""
    include_path: RecipePath | None = None
    """A folder of your own lm-eval task YAMLs (lm-eval's --include_path)."""
    limit: int | None = Field(default=None, ge=1)
    """Score only the first this many documents of each task (null: all)."""
    batch_size: int = Field(default=8, ge=1)
    """lm-eval's batch size."""
    every: int | None = Field(default=None, ge=1)
    """Also run the tasks every this many optimizer steps (null: only at the start and the end of training)."""

    @field_validator("tasks")
    @classmethod
    def _distinct_names(cls, tasks: list[HarnessTask]) -> list[HarnessTask]:
        seen: set[str] = set()
        for task in tasks:
            if task.result_name in seen:
                raise ValueError(f"two tasks are named {task.result_name}; tell them apart with `name:`")
            seen.add(task.result_name)
        return tasks


class IdentifierConfig(Section):
    """The language identifier that names a continuation's language: one of the curation stage's backends."""

    backend: Literal["py3langid", "lingua", "fasttext"] = "py3langid"
    """As `curate.language_id.backend`: py3langid and lingua ship their models; fasttext reads `model`."""
    model: RecipePath | None = None
    """A local fastText model file (GlotLID's model_v3.bin, lid.176.bin); fasttext only."""

    @model_validator(mode="after")
    def _as_curation_checks_it(self) -> "IdentifierConfig":
        self.curation()  # the same rules as curate.language_id (fasttext needs a model, the others none)
        return self

    def curation(self) -> LanguageIdConfig:
        return LanguageIdConfig(backend=self.backend, model=self.model)


class GenerateConfig(Section):
    """Greedy continuations of the first words of held-out sentences, and the language they are written in."""

    prompts: dict[str, RecipePath] = {}
    """Sentences per language (`vi: eval/vie.tsv`), one a line: .txt, .tsv (`eval.text_field` column) or .jsonl."""
    max_new_tokens: int = Field(default=48, ge=1, le=4096)
    """Tokens generated after each prompt."""
    n: int = Field(default=32, ge=1)
    """Prompts per language: a sample of this many lines of each file (all when the file has fewer)."""
    prompt_words: int = Field(default=8, ge=1)
    """A prompt is the first this many words of a sentence (at most half of it; characters where a sentence has
    no spaces)."""
    seed: int = 0
    """Which lines are sampled; the continuations themselves are greedy."""
    language_id: IdentifierConfig = IdentifierConfig()
    """The language identifier (a `curate.language_id` backend: py3langid by default) that names each
    continuation's language and that of each of its sentences."""


class LensConfig(Section):
    """The logit lens: the final norm and output head applied to every block's hidden state."""

    text: dict[str, RecipePath] = {}
    """Held-out text per language (parallel sentences, `vi: eval/vie.tsv`), one document a line."""
    max_documents: int | None = Field(default=100, ge=1)
    """Use the first this many documents of each file (null: all)."""


class EvalConfig(Section):
    text: dict[str, RecipePath] = {}
    """Held-out text per language (`vi: eval/vie.tsv`), scored in bits per byte: .txt (a document per line),
    .tsv (a `text` column) or .jsonl (`text_field`). A name that is a language code (`vi`, `zho_Hans`) says the
    set's language: fertility is counted per character for a language written without spaces, else per word."""
    text_field: str = "text"
    """The .jsonl field or .tsv column holding the text."""
    choice: dict[str, ChoiceSetConfig] = {}
    """Multiple-choice sets by name (`xcopa_vi: {path: eval/xcopa/vi/test.vi.jsonl, lang: vi}`), scored by accuracy."""
    every: int | None = Field(default=None, ge=1)
    """Optimizer steps between evaluations during training (besides before step 0 and at the end); null: only those."""
    background: bool = False
    """During training, evaluate in a second process on a saved copy of the weights, so that training does not wait
    (graftlm/train/background.py); the results land in metrics.jsonl in step order as in the foreground, with the
    same numbers. It costs a copy of the weights on disk (runs/<name>/eval/pending/) per waiting evaluation (two at
    most: a third evaluation step waits) and a second process competing for the CPU or GPU (on a GPU, a second copy
    of the model in its memory); it pays on GPUs and wherever an evaluation takes longer than the steps between
    two. A run killed with evaluations pending resumes them. lora/layra: the worker evaluates the weights with the
    adapters merged (equal up to rounding)."""
    max_documents: int | None = Field(default=100, ge=1)
    """During training, score only the first this many documents of each text set (null: all)."""
    max_items: int | None = Field(default=100, ge=1)
    """During training, score only the first this many items of each choice set (null: all)."""
    batch_size: int = Field(default=16, ge=1)
    """Sequences per forward pass."""
    max_length: int | None = Field(default=None, ge=8)
    """Context length in tokens; longer documents are scored in overlapping windows. Default: the model's own,
    capped at 2048."""
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    """float32 agrees with a plain transformers computation; bfloat16 (autocast) is faster where bf16 is fast;
    auto: bfloat16 where the device computes it faster than float32, else float32 (graftlm/precision.py).
    (lm-eval tasks always run in the model's own precision, as lm-eval's command line does.)"""
    harness: HarnessConfig = HarnessConfig()
    """lm-evaluation-harness tasks, at the start and the end of training (and every `harness.every` steps)."""
    generate: GenerateConfig = GenerateConfig()
    """Generations and language mixing, at the start and the end of training."""
    lens: LensConfig = LensConfig()
    """The logit lens per layer, at the start and the end of training."""

    @property
    def names_anything(self) -> bool:
        """Whether there is anything to evaluate."""
        return bool(self.text or self.choice or self.harness.tasks or self.generate.prompts or self.lens.text)
