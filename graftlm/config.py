"""Building blocks of recipe sections: a strict base model, a path type that resolves against the recipe, a model
and a language type, and the plain names that may become folders of the run directory."""

from __future__ import annotations

import os
import re
import types
import typing
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator

_PLAIN_NAME = re.compile(r"[^\W_][\w.-]*")
PLAIN_NAME_RULE = "letters, digits, '.', '_' or '-', starting with a letter or digit"


def plain_name(name: str) -> str:
    """A recipe value that names a folder of the run directory (the recipe's name, a source): one path component
    that cannot climb out (`..`, `/`, `~`), in any script (`tiếng-việt`, `中文` are fine)."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or len(name.encode("utf-8")) > 128:
        raise ValueError(f"must be {PLAIN_NAME_RULE}, at most 128 bytes (it names a folder), got {name!r}")
    return name


PlainName = Annotated[str, AfterValidator(plain_name)]

from graftlm.languages import normalize_language


class Section(BaseModel):
    """A recipe section: unknown keys are errors, assignments are validated too, NaN and infinity are not numbers,
    and neither are YAML booleans (`max_steps: true` is an error, not 1 step)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name is not None and info.field_name in cls.model_fields:
            problem = _misplaced_boolean(value, cls.model_fields[info.field_name].annotation)
            if problem is not None:
                raise ValueError(problem)
        return value


def _misplaced_boolean(value: Any, annotation: Any, where: str = "") -> str | None:
    """Where `value` holds true/false for a number `annotation` asks for (pydantic would read it as 1/0), or None."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _misplaced_boolean(value, args[0], where)
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, bool):
            if bool in args or Any in args or not any(a in (int, float) for a in args):
                return None
            return _describe_boolean(value, int if float not in args else float, where)
        for arg in args:  # a container inside a union: check against the matching container type
            if typing.get_origin(arg) in (list, dict) and isinstance(value, typing.get_origin(arg)):
                return _misplaced_boolean(value, arg, where)
        return None
    if origin is list and isinstance(value, list) and args:
        return next((p for i, item in enumerate(value)
                     if (p := _misplaced_boolean(item, args[0], f"{where}[{i}]")) is not None), None)
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return next((p for key, item in value.items()
                     if (p := _misplaced_boolean(item, args[1], f"{where}.{key}" if where else str(key))) is not None),
                    None)
    if isinstance(value, bool) and annotation in (int, float):
        return _describe_boolean(value, annotation, where)
    return None


def _describe_boolean(value: bool, expected: type, where: str) -> str:
    noun = "an integer" if expected is int else "a number"
    return f"{where + ': ' if where else ''}expected {noun}, got {str(value).lower()}"


def _resolve_path(value: str, info: ValidationInfo) -> str:
    """Relative paths in a recipe resolve against the recipe file's folder (given as validation context)."""
    value = os.path.expanduser(value)
    base_dir = (info.context or {}).get("base_dir")
    if base_dir and not os.path.isabs(value):
        value = os.path.normpath(os.path.join(base_dir, value))
    return value


RecipePath = Annotated[str, AfterValidator(_resolve_path)]
"""A file, folder or glob named in a recipe."""

_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def resolve_model_spec(spec: str, info: ValidationInfo) -> str:
    """A model named in a recipe: one that names an existing file or folder becomes an absolute path (relative to
    the recipe's folder), and so does one that can only be a path (a typo'd local path is reported as a missing
    folder, not tried on the hub): it starts with `.`, `/` or `~`, ends with .gguf, is not `name` or `org/name`,
    or its first folder exists here. Anything else (a bundled name, a hub id) is kept."""
    base_dir = (info.context or {}).get("base_dir", ".")
    candidate = os.path.join(base_dir, os.path.expanduser(spec))
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or not _HUB_ID.fullmatch(spec) \
        or ("/" in spec and os.path.isdir(os.path.join(base_dir, spec.split("/")[0])))
    if os.path.exists(candidate) or looks_like_path:
        return os.path.normpath(os.path.abspath(candidate))
    return spec


ModelSpec = Annotated[str, AfterValidator(resolve_model_spec)]
"""A model: a bundled name (`smollm2-135m`), a Hugging Face folder, a .gguf file or a hub id."""


LanguageCode = Annotated[str, AfterValidator(normalize_language)]
"""A language in a recipe (`sw`, `swh`, `swh_Latn`, ...), held as its canonical code (graftlm/languages.py); an
unknown code is an error naming the key."""
