"""The `vocab:` recipe section (see graftlm/vocab/)."""

from __future__ import annotations

from graftlm.config import Section


class VocabConfig(Section):
    source: str | None = None
    """The target-language source the new tokenizer is trained on."""
