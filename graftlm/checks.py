"""What can be checked about a recipe's inputs in well under a second, before any stage does work: so a missing
data file is reported at once, not after the base model was exported.

`check_inputs(recipe)` raises the first problem as one line (a `GraftError` naming the key or the file):

    base_model                 resolves (bundled package, .gguf, folder with config.json, hub id); its weights files
                               are whole (a .safetensors or .gguf cut short is named); a hub id is in the local
                               cache, or the hub can be reached (offline it fails here, at once)
    train.seq_len              fits the model's positions (config.json max_position_embeddings, GGUF context_length)
    eval.max_length            the same
    sources.<name>.paths       every file and glob matches a file of a known format
    sources.<name>             (trained on, raw, uncompressed) holds at least one sequence: a file of B bytes packs
                               into at most 2·B tokens (a token is at least a byte; one EOS, at most one prefix
                               token per document), so 2·B < seq_len + 1 cannot make one sequence
    eval.text.<name>, eval.choice.<name>.path, eval.generate.prompts.<lang>, eval.lens.text.<lang>   exist
    curate.language_id.model   exists (backend fasttext)
    report.trackers            each tracker's package is installed
    merge.chat_vector.instruct, merge.chat_vector.base   resolve like base_model

What only the data can tell (a compressed or curated source shorter than a sequence) is checked when the sampler
opens the packed sources (graftlm/data/mix.py), still before the first step.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from graftlm.data.read import COMPRESSIONS, file_format, resolve_paths
from graftlm.errors import DataError, GraftError, RecipeError
from graftlm.models import check_model, model_positions
from graftlm.train.trackers import check_trackers

if TYPE_CHECKING:
    from graftlm.recipe import Recipe


def check_inputs(recipe: "Recipe") -> None:
    positions, where = _keyed("base_model", model_positions, recipe.base_model)
    if positions is not None:
        if recipe.train.seq_len > positions:
            raise RecipeError(f"train.seq_len: {recipe.train.seq_len} is more than the {positions} positions the "
                              f"model was trained for ({where})")
        if recipe.eval.max_length is not None and recipe.eval.max_length > positions:
            raise RecipeError(f"eval.max_length: {recipe.eval.max_length} is more than the {positions} positions of "
                              f"the model ({where})")
    curated = set(recipe.curated_sources())
    weights = recipe.mixture_weights()
    for name, source in recipe.sources.items():
        files = resolve_paths(source, name)
        for path in files:
            file_format(path, source.format)
        if weights.get(name, 0) > 0 and name not in curated and not any(f.endswith(COMPRESSIONS) for f in files):
            size = sum(os.path.getsize(f) for f in files)
            window = recipe.train.seq_len + 1
            if 2 * size < window:
                raise DataError(f"sources.{name}: {size:,} bytes of text make fewer tokens than one training sequence "
                                f"(train.seq_len + 1 = {window:,}); add text or lower train.seq_len")
    for name, path in recipe.eval.text.items():
        _check_file(path, f"eval.text.{name}")
    for name, choice in recipe.eval.choice.items():
        _check_file(choice.path, f"eval.choice.{name}.path")
    for lang, path in recipe.eval.generate.prompts.items():
        _check_file(path, f"eval.generate.prompts.{lang}")
    for lang, path in recipe.eval.lens.text.items():
        _check_file(path, f"eval.lens.text.{lang}")
    if recipe.curate is not None and recipe.curate.language_id.model is not None:
        _check_file(recipe.curate.language_id.model, "curate.language_id.model")
    check_trackers(recipe.report.trackers)
    chat = recipe.merge.chat_vector if recipe.merge is not None else None
    if chat is not None:
        _keyed("merge.chat_vector.instruct", check_model, chat.instruct)
        _keyed("merge.chat_vector.base", check_model, chat.base)


def _keyed(key: str, check, spec: str):
    """`check(spec)`, its error naming `key` where it names base_model."""
    try:
        return check(spec)
    except GraftError as e:
        message = str(e)
        if key == "base_model" or not message.startswith("base_model: "):
            raise
        raise type(e)(f"{key}: {message.removeprefix('base_model: ')}") from None


def _check_file(path: str, key: str) -> None:
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, expected a file ({key})")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file ({key})")
