"""The `report:` recipe section."""

from __future__ import annotations

from pydantic import Field

from graftlm.config import Section


class ReportConfig(Section):
    source_margin_bpb: float = Field(default=0.05, ge=0)
    """The largest rise in a source language's bits per byte that still counts as keeping it."""
