"""`graft run`: the stages of a recipe in order. Each stage reads the outputs of the ones before it from the run
directory and skips itself when its complete output is already there."""

from __future__ import annotations

from typing import Callable

from graftlm.progress import log
from graftlm.recipe import Recipe
from graftlm.runs import RunDir


def _base(recipe: Recipe, run: RunDir) -> None:
    from graftlm.models import export_base

    export_base(recipe, run, log=log)


def _curate(recipe: Recipe, run: RunDir) -> None:
    if recipe.curate is None:
        return
    from graftlm.curate.stage import run_curate

    run_curate(recipe, run)


def _vocab(recipe: Recipe, run: RunDir) -> None:
    if recipe.vocab is None:
        return
    from graftlm.vocab.stage import run_vocab

    run_vocab(recipe, run)


def _pack(recipe: Recipe, run: RunDir) -> None:
    from graftlm.data.pack import pack_all

    pack_all(recipe, run)


STAGES: dict[str, Callable[[Recipe, RunDir], None]] = {
    "base": _base,
    "curate": _curate,
    "vocab": _vocab,
    "pack": _pack,
}
PREPARE_STAGES = ("base", "curate", "vocab", "pack")
"""What `graft prepare` runs: everything up to packed training data."""


def run_stages(recipe: Recipe, run: RunDir, stages=tuple(STAGES)) -> None:
    run.write_recipe(recipe)
    for name in stages:
        STAGES[name](recipe, run)
