"""Building blocks of recipe sections: a strict base model and a path type that resolves against the recipe."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo


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
