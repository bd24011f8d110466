"""The recipe: one YAML file that describes a whole run, validated into typed sections.

Loading goes: YAML → `--set key=value` overrides → validation. Relative paths resolve against the recipe's
folder; every problem becomes one `RecipeError` whose message starts with the key path.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator

from graftlm.config import ModelSpec, PlainName, Section, plain_name
from graftlm.curate.config import CurateConfig
from graftlm.data.config import MixtureConfig, PackConfig, SourceConfig
from graftlm.errors import RecipeError
from graftlm.evaluate.config import EvalConfig
from graftlm.languages import language_or_none
from graftlm.merge.config import MergeConfig
from graftlm.plan.config import PlanConfig
from graftlm.report.config import ReportConfig
from graftlm.train.config import TrainConfig
from graftlm.vocab.config import VocabConfig

DEFAULT_BASE_MODEL = "smollm2-135m"
BASE_LANGUAGE = "en"
"""The language the supported base models were mostly trained on: replay keeps it, the target is another one."""
DEMO_RECIPE = "recipes/demo-vi.yaml"


class Recipe(Section):
    name: PlainName
    """The run's name: its outputs go to `runs/<name>/`."""
    base_model: ModelSpec = DEFAULT_BASE_MODEL
    """`smollm2-135m` (bundled), a Hugging Face folder, a .gguf file, or a hub id."""
    trust_remote_code: bool = False
    sources: dict[str, SourceConfig] = Field(min_length=1)
    target: str | None = None
    """The language the run teaches: the `lang` of some sources (or a source's name when sources have no `lang`).
    Default: the one language of the mixture's sources other than the base's (English); set it when there are
    several, or when the target is English."""
    curate: CurateConfig | None = None
    """Curation of raw text on datatrove; absent (null) skips the stage."""
    vocab: VocabConfig | None = None
    """Vocabulary extension; absent (null) trains with the base tokenizer."""
    mixture: MixtureConfig = MixtureConfig()
    pack: PackConfig = PackConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    merge: MergeConfig | None = None
    """Averaging and merging after training (graftlm/merge/); absent (null): the trained model is the result."""
    report: ReportConfig = ReportConfig()
    plan: PlanConfig | None = None
    """Pilot runs and a fitted law that choose the mixture and the budget (graftlm/plan/); absent (null): none."""
    _target: str = PrivateAttr(default="")

    @field_validator("sources")
    @classmethod
    def _sources_are_plain_names(cls, sources: dict[str, SourceConfig]) -> dict[str, SourceConfig]:
        for name in sources:  # each names packed/<name>/ and curated/<name>/
            try:
                plain_name(name)
            except ValueError as e:
                raise _KeyProblem(f"sources.{name}", f"a source's name {e}") from None
        return sources

    @model_validator(mode="after")
    def _mixture_names_sources(self) -> "Recipe":
        for name in self.mixture.weights:
            if name not in self.sources:
                raise _KeyProblem(f"mixture.{name}", f"not a source (sources: {', '.join(self.sources)})")
        return self

    @model_validator(mode="after")
    def _curated_sources_have_a_language(self) -> "Recipe":
        for name in self.curate.sources if self.curate is not None else []:
            if name not in self.sources:
                raise _KeyProblem("curate.sources", f"'{name}' is not a source (sources: {', '.join(self.sources)})")
            if not self.sources[name].lang:
                raise _KeyProblem(f"sources.{name}.lang", "required to curate the source (its language, e.g. vi)")
        return self

    @model_validator(mode="after")
    def _vocab_source_is_a_source(self) -> "Recipe":
        if self.vocab is not None and self.vocab.source is not None and self.vocab.source not in self.sources:
            raise _KeyProblem("vocab.source", f"not a source (sources: {', '.join(self.sources)})")
        return self

    @model_validator(mode="after")
    def _distilled_sources_are_sources(self) -> "Recipe":
        distill = self.train.distill
        for name in (distill.sources or []) if distill is not None else []:
            if name not in self.sources:
                raise _KeyProblem("train.distill.sources", f"'{name}' is not a source (sources: "
                                  f"{', '.join(self.sources)})")
        return self

    @model_validator(mode="after")
    def _averaging_is_chosen_once(self) -> "Recipe":
        if self.merge is not None and self.merge.average_last > 1 and self.train.ema and self.train.ema.export:
            raise _KeyProblem("merge.average_last", "averages checkpoints, and train.ema.export exports the moving "
                              "average: choose one")
        if self.merge is not None and self.merge.average_last > self.train.keep_checkpoints:
            raise _KeyProblem("merge.average_last", f"needs that many checkpoints kept: set train.keep_checkpoints "
                              f"to at least {self.merge.average_last}")
        return self

    @model_validator(mode="after")
    def _one_target_language(self) -> "Recipe":
        self._target = self._find_target()
        return self

    def _find_target(self) -> str:
        """See `target`; every stage asks `target_language`, so that the vocabulary, the verdict, distillation,
        curation and the report agree on it."""
        languages = {name: self.language_of(name) for name in self.sources}
        if self.target is not None:
            named = language_or_none(self.target)
            target = named.code if named is not None else self.target  # `vie`, `vi`, `vie_Latn`: the same
            if target not in languages.values():
                raise _KeyProblem("target", f"{self.target!r} is not the language of any source (languages: "
                                  f"{', '.join(sorted(set(languages.values())))})")
            return target
        mixed = [name for name, weight in self.mixture_weights().items() if weight > 0]
        labelled = [name for name in mixed if self.sources[name].lang]
        foreign = sorted({languages[name] for name in labelled} - {BASE_LANGUAGE})
        if len(foreign) == 1:
            return foreign[0]
        if len(foreign) > 1:
            raise _KeyProblem("target", f"the mixture holds several languages besides {BASE_LANGUAGE} "
                              f"({', '.join(foreign)}): say which one the run teaches, e.g. target: {foreign[0]}")
        if labelled:
            return BASE_LANGUAGE
        weights = self.mixture_weights()
        return max(mixed, key=lambda name: (weights[name], -mixed.index(name)))

    def language_of(self, source: str) -> str:
        """A source's language: its `lang`, or its name when it has none."""
        return self.sources[source].lang or source

    @property
    def target_language(self) -> str:
        return self._target

    def target_sources(self) -> list[str]:
        """The sources in the target language, in recipe order."""
        return [name for name in self.sources if self.language_of(name) == self._target]

    def replay_sources(self) -> list[str]:
        """The sources that keep the base's languages and skills (replay): those not in the target language."""
        return [name for name in self.sources if self.language_of(name) != self._target]

    def vocab_source(self) -> str:
        """The source the vocabulary grows from: `vocab.source`, else the heaviest source in the target language
        (the first on a tie)."""
        if self.vocab is not None and self.vocab.source is not None:
            return self.vocab.source
        weights, names = self.mixture_weights(), self.target_sources()
        return max(names, key=lambda name: (weights.get(name, 0.0), -names.index(name)))

    def curated_sources(self) -> list[str]:
        """The sources curation cleans: `curate.sources`, else the target-language sources that have a `lang`."""
        if self.curate is None:
            return []
        if self.curate.sources:
            return list(self.curate.sources)
        return [name for name in self.target_sources() if self.sources[name].lang]

    def mixture_weights(self) -> dict[str, float]:
        """The training mixture: the recipe's weights, or every source with equal weight when none is given."""
        return dict(self.mixture.weights) or {name: 1.0 for name in self.sources}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


class _KeyProblem(ValueError):
    """Raised inside validators to report a problem at a key path other than the one being validated."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                _seen: tuple[Path, ...] = ()) -> Recipe:
    """Read, override and validate a recipe. `path=None` means the bundled demo recipe.

    A recipe may start from another one, `extends: other.yaml` (relative to its own folder): the other recipe is
    resolved first (its paths against its own folder), then this one's keys are merged over it, mapping by
    mapping."""
    path = Path(path) if path is not None else find_demo_recipe()
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is not None:
        parent_path = (path.parent / str(parent)).resolve()
        if parent_path in _seen:
            raise RecipeError(f"{path}: extends: {parent} makes a cycle")
        resolved = load_recipe(parent_path, _seen=(*_seen, path.resolve())).model_dump(mode="json")
        data = _merged(resolved, data)
    for override in overrides:
        apply_override(data, override)
    return validate_recipe(data, base_dir=path.resolve().parent, origin=str(path))


def _merged(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        both_mappings = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both_mappings else value
    return merged


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of recipe keys at the top level")
    return data


def validate_recipe(data: dict, base_dir: str | os.PathLike = ".", origin: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data, context={"base_dir": str(base_dir)})
    except ValidationError as e:
        raise RecipeError(_describe(e.errors()[0], origin)) from None


def apply_override(data: dict, override: str) -> None:
    """Apply one `a.b.c=value` to the raw recipe; the value is read as YAML (`3e-4`, `[a, b]`, `true`)."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {override}: expected key=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {key}: '{'.'.join(parts[:i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def find_demo_recipe() -> Path:
    """The bundled demo recipe: in the current folder's `recipes/`, else in the source checkout beside the package."""
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / DEMO_RECIPE).is_file():
            return root / DEMO_RECIPE
    raise RecipeError(f"{DEMO_RECIPE}: not found here or beside the graftlm package; give a recipe path")


# ---- turning pydantic's errors into one line that names the key ----------------------------------------

_EXPECTED = {
    "float": "a number", "int": "an integer", "bool": "true or false", "string": "a string",
    "list": "a list", "dict": "a mapping", "model": "a mapping", "model_attributes": "a mapping",
}


def _describe(err: dict, origin: str) -> str:
    loc = [str(p) for p in err["loc"] if p != "weights"]  # MixtureConfig keeps its weights flat in the recipe
    key = ".".join(loc) or origin
    kind, value = err["type"], err.get("input")
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, _KeyProblem):
        return str(cause)
    if kind == "missing":
        return f"{key}: required key missing"
    if kind == "extra_forbidden":
        hint = difflib.get_close_matches(loc[-1], _known_keys(loc[:-1]), n=1)
        return f"{key}: unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
    for prefix, expected in _EXPECTED.items():
        if kind in (f"{prefix}_type", f"{prefix}_parsing", f"{prefix}_from_float"):
            return f"{key}: expected {expected}, got {_show(value)}"
    if kind == "literal_error":
        return f"{key}: expected one of {err['ctx']['expected']}, got {_show(value)}"
    message = str(cause) if cause is not None else err["msg"]
    message = message[0].lower() + message[1:]
    return f"{key}: {message}" + ("" if kind == "value_error" else f", got {_show(value)}")


def _show(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return repr(value) if isinstance(value, str) else str(value)


def _known_keys(loc: list[str]) -> list[str]:
    """The keys allowed at a location of the recipe, for 'did you mean' hints."""
    node: Any = Recipe
    parts = list(loc)
    while parts:
        node = _strip_optional(node)
        if typing.get_origin(node) is dict:  # a mapping of sections (`sources.<name>`): skip the name
            node = typing.get_args(node)[1]
        elif isinstance(node, type) and issubclass(node, BaseModel) and parts[0] in node.model_fields:
            node = node.model_fields[parts[0]].annotation
        else:
            return []
        parts.pop(0)
    node = _strip_optional(node)
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _strip_optional(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation
