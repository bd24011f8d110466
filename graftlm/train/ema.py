"""An exponential moving average of the trained weights: `shadow ← decay · shadow + (1 - decay) · weights` after
each optimizer step, kept in fp32 beside the model and saved in every checkpoint (a resumed run continues it
exactly). It starts at the start model, so it also pulls the result back toward it: with few steps and a decay
close to 1, the average barely leaves the start. Only trained parameters are averaged: under LoRA those are the
adapter's factors A and B, so the exported average is (mean B)(mean A) rather than the mean of the products B·A —
the same to first order while the factors move slowly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

EMA_FILE = "ema.safetensors"


class EMA:
    def __init__(self, named_parameters: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.names = [name for name, _ in named_parameters]
        self.params = [param for _, param in named_parameters]
        self.decay = decay
        self.shadow = [param.detach().float().clone() for param in self.params]

    @torch.no_grad()
    def update(self) -> None:
        # one fused call: a loop of lerp_ launches a kernel per parameter after every optimizer step
        torch._foreach_lerp_(self.shadow, [param.detach().float() for param in self.params], 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own ones again after it."""
        saved = [param.detach().clone() for param in self.params]
        with torch.no_grad():
            for param, shadow in zip(self.params, self.shadow):
                param.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, own in zip(self.params, saved):
                    param.copy_(own)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({name: shadow.contiguous() for name, shadow in zip(self.names, self.shadow)}, folder / EMA_FILE)

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        saved = load_file(folder / EMA_FILE)
        self.shadow = [saved[name].to(shadow.device) for name, shadow in zip(self.names, self.shadow)]
