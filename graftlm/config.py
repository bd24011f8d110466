"""Building blocks of recipe sections: a strict base model, a path type that resolves against the recipe, a model
and a language type."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo

from graftlm.languages import normalize_language


class Section(BaseModel):
    """A recipe section: unknown keys are errors, assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _resolve_path(value: str, info: ValidationInfo) -> str:
    """Relative paths in a recipe resolve against the recipe file's folder (given as validation context)."""
    value = os.path.expanduser(value)
    base_dir = (info.context or {}).get("base_dir")
    if base_dir and not os.path.isabs(value):
        value = os.path.normpath(os.path.join(base_dir, value))
    return value


RecipePath = Annotated[str, AfterValidator(_resolve_path)]
"""A file, folder or glob named in a recipe."""


def resolve_model_spec(spec: str, info: ValidationInfo) -> str:
    """A model named in a recipe: one that names an existing file or folder becomes an absolute path (relative to
    the recipe's folder); anything else (a bundled name, a hub id) is kept."""
    base_dir = (info.context or {}).get("base_dir", ".")
    candidate = os.path.join(base_dir, os.path.expanduser(spec))
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf")
    if os.path.exists(candidate) or looks_like_path:
        return os.path.normpath(os.path.abspath(candidate))
    return spec


ModelSpec = Annotated[str, AfterValidator(resolve_model_spec)]
"""A model: a bundled name (`smollm2-135m`), a Hugging Face folder, a .gguf file or a hub id."""


LanguageCode = Annotated[str, AfterValidator(normalize_language)]
"""A language in a recipe (`sw`, `swh`, `swh_Latn`, ...), held as its canonical code (graftlm/languages.py); an
unknown code is an error naming the key."""
