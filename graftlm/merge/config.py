"""The `merge:` recipe section: what becomes of the trained weights before the verdict."""

from __future__ import annotations

from pydantic import Field

from graftlm.config import ModelSpec, Section


class ChatVectorConfig(Section):
    """Task arithmetic: add `scale · (instruct − base)` to the trained weights (the "chat vector")."""

    instruct: ModelSpec
    """The instruction-tuned model (anything `base_model:` accepts)."""
    base: ModelSpec
    """The pretrained model it was tuned from (the one the run's base_model continued, or its twin)."""
    scale: float = 1.0


class MergeConfig(Section):
    """Applied in this order: average checkpoints, interpolate toward the start model, add the chat vector."""

    average_last: int = Field(default=1, ge=1)
    """Average the weights of the last this many checkpoints (the final one included); 1: the trained model."""
    alpha: float = Field(default=1.0, ge=0)
    """`start + alpha · (trained − start)`: 1 keeps the trained weights, 0 the start model, 0.5 halfway."""
    chat_vector: ChatVectorConfig | None = None
