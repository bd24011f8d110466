"""The `curate:` recipe section (see graftlm/curate/)."""

from __future__ import annotations

from graftlm.config import Section


class CurateConfig(Section):
    sources: list[str] = []
    """Sources to curate; empty means every source that has a `lang`."""
