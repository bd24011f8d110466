"""The `eval:` recipe section: held-out text and multiple-choice sets per language."""

from __future__ import annotations

from graftlm.config import RecipePath, Section


class EvalConfig(Section):
    text: dict[str, RecipePath] = {}
    """Held-out text per language (`vi: eval/vie.tsv`), scored in bits per byte."""
