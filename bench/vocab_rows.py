"""Which embedding rows learned: how far training moved the rows a vocabulary extension added, beside the base's
own rows, grouped by how often the target text uses each token.

    .venv/bin/python bench/vocab_rows.py RUN_DIR [RUN_DIR ...] [--source NAME]

For each run directory (a `graft run` or a `graft compare` variant that trained from a vocabulary-extended model):
the start model (`vocab/model/`) against the trained one (`model/`), per weight (the input embeddings, and the
output head when it is untied): the mean L2 distance a row moved, relative to the mean norm of the base rows at the
start, for the new rows and the base rows, each split into frequency buckets of the packed target source (how
many times the token occurs in `packed/<source>/`: an upper bound of what training could show it). A new token's
row can only learn from the batches that hold it; at a small budget the rare ones barely move.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BUCKETS = ((0, 0), (1, 9), (10, 99), (100, 999), (1000, None))


def bucket_label(low: int, high: int | None) -> str:
    return f"{low}" if high == low else f"{low}-{high if high is not None else ''}"


def bucket_of(count: float) -> int:
    """The index in BUCKETS of a count (rounded)."""
    count = round(count)
    return next(i for i, (low, high) in enumerate(BUCKETS) if count >= low and (high is None or count <= high))
WEIGHTS = ("model.embed_tokens.weight", "lm_head.weight")


def token_counts(packed: Path, rows: int) -> np.ndarray:
    from graftlm.data.pack import PackedSource

    counts = np.zeros(rows, dtype=np.int64)
    for tokens in PackedSource.open(packed).memmaps():
        counts += np.bincount(np.asarray(tokens, dtype=np.int64), minlength=rows)[:rows]
    return counts


def moved(start: Path, end: Path, counts: np.ndarray, first_new: int, new_rows: range) -> list[dict]:
    from safetensors import safe_open

    rows = []
    with safe_open(start / "model.safetensors", "pt") as a, safe_open(end / "model.safetensors", "pt") as b:
        for name in WEIGHTS:
            if name not in a.keys() or name not in b.keys():
                continue
            before, after = a.get_tensor(name).float(), b.get_tensor(name).float()
            scale = before[:first_new].norm(dim=1).mean().item()
            distance = (after - before).norm(dim=1).numpy() / scale
            for kind, ids in (("new", np.arange(new_rows.start, new_rows.stop)), ("base", np.arange(first_new))):
                for low, high in BUCKETS:
                    c = counts[ids]
                    chosen = ids[(c >= low) & ((c <= high) if high is not None else True)]
                    if len(chosen):
                        rows.append({"weight": name.split(".")[-2], "rows": kind,
                                     "count": bucket_label(low, high),
                                     "tokens": len(chosen), "moved": float(distance[chosen].mean())})
    return rows


def target_source(run) -> str:
    from graftlm.recipe import load_recipe

    recipe = load_recipe(run.root / "recipe.yaml")
    return next(name for name in recipe.sources if recipe.language_of(name) == recipe.target_language)


def main() -> None:
    from graftlm.runs import RunDir
    from graftlm.vocab.init import vocab_rows

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--source", help="the packed source whose token counts group the rows (default: the run's "
                                         "first source in its target language)")
    args = parser.parse_args()
    for root in args.runs:
        run = RunDir(root)
        added = vocab_rows(run.vocab / "model")
        if added is None:
            print(f"{root}: not trained from a vocabulary-extended model")
            continue
        counts = token_counts(run.packed / (args.source or target_source(run)), added.rows)
        print(f"\n{root}: {added.new_tokens:,} new rows; distance moved / mean base-row norm")
        print(f"{'weight':<14}{'rows':<6}{'occurrences':>12}{'tokens':>8}{'moved':>9}")
        for r in moved(run.vocab / "model", run.model, counts, added.first_new, added.new_rows):
            print(f"{r['weight']:<14}{r['rows']:<6}{r['count']:>12}{r['tokens']:>8}{r['moved']:>9.4f}")


if __name__ == "__main__":
    main()
