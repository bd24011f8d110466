"""Where a vocabulary extension wins and loses, word by word: the bits each model spends on each whitespace word of
a held-out text, grouped by how the extended tokenizer reads the word and how often training could show it.

    .venv/bin/python bench/vocab_words.py RUN_DIR [RUN_DIR ...] [--text NAME] [--max-documents N]

Each run directory (a `graft run`, or a `graft compare` variant) gives two models: the one training started from
(step 0) and the trained one (`model/`). The first run whose start model is vocabulary-extended decides the groups:
a word is read by the extended tokenizer either with base tokens only, or with new tokens, bucketed by how many
times training read its rarest new token (expected: its occurrences in the packed target source times the share of
that source training read).
For every model, the bits of each token (−log₂ p, each document from the start token, as `graft eval` scores) go to
the word holding the token's first non-space character, the bytes of each word with the whitespace before it; a
group's bits per byte is its bits over its bytes, and its share is its share of the text's bytes. The total of a
column is the set's bits per byte, so the rows show where two runs' gap comes from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.vocab_rows import BUCKETS, bucket_label, bucket_of, target_source, token_counts  # noqa: E402


def word_spans(text: str) -> list[tuple[int, int]]:
    """Each whitespace word as (start, end) character offsets, its start moved back over the whitespace before it."""
    spans, i, n = [], 0, len(text)
    while i < n:
        start = i
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            break
        while i < n and not text[i].isspace():
            i += 1
        spans.append((start, i))
    return spans


def word_of_tokens(text: str, offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """For each token, the index of the word holding its first non-space character (the last word for a token of
    whitespace only at the end)."""
    ends = np.array([end for _, end in spans])
    words = []
    for start, end in offsets:
        first = start
        while first < end and text[first].isspace():
            first += 1
        words.append(int(min(np.searchsorted(ends, first, side="right"), len(spans) - 1)))
    return words


def token_bits(model, ids: list[int], start_id: int, max_length: int) -> np.ndarray:
    """−log₂ p of each token, the document from the start token and cut into `graft eval`'s windows."""
    import torch

    from graftlm.evaluate.bpb import windows

    bits = []
    with torch.no_grad():
        for span in windows([start_id, *ids], max_length):
            logits = model(torch.tensor([span.ids])).logits[0, span.first - 1:-1].float()
            targets = torch.tensor(span.ids[span.first:])[:, None]
            bits.append(-torch.log_softmax(logits, dim=-1).gather(1, targets)[:, 0] / np.log(2))
    return torch.cat(bits).numpy()


def word_bits(model_dir: Path, texts: list[str],
              max_length: int | None = None) -> tuple[list[np.ndarray], list[list[list[int]]]]:
    """Per document, the bits of each word, and the ids of the tokens of each word, under one model (windows of
    `max_length` tokens, default the model's context as `graft eval` takes it)."""
    import torch

    from graftlm.evaluate.scoring import context_length, start_token_id
    from graftlm.models import load_model, load_tokenizer

    model, tokenizer = load_model(str(model_dir), dtype=torch.float32).eval(), load_tokenizer(str(model_dir))
    start_id, max_length = start_token_id(tokenizer), context_length(model, max_length)
    bits, pieces = [], []
    for text in texts:
        spans = word_spans(text)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        words = word_of_tokens(text, encoded["offset_mapping"], spans)
        per_token = token_bits(model, encoded["input_ids"], start_id, max_length)
        per_word, ids = np.zeros(len(spans)), [[] for _ in spans]
        for token, word, b in zip(encoded["input_ids"], words, per_token):
            per_word[word] += b
            ids[word].append(token)
        bits.append(per_word)
        pieces.append(ids)
    return bits, pieces


def groups(pieces: list[list[list[int]]], first_new: int, read: np.ndarray) -> list[list[tuple[int, str]]]:
    """Per document, each word's group (an order, a label) under the extended tokenizer's pieces; `read`: how many
    times training read each token (expected)."""
    out = []
    for doc in pieces:
        labels = []
        for ids in doc:
            new = [read[i] for i in ids if i >= first_new]
            if not new:
                labels.append((-1, "base tokens only"))
                continue
            i = bucket_of(min(new))
            labels.append((i, f"new, rarest read {bucket_label(*BUCKETS[i])}"))
        out.append(labels)
    return out


def times_read(run, source: str, counts: np.ndarray) -> np.ndarray:
    """How many times training read each token, expected: its occurrences in the packed source times the share of
    the source that training read."""
    from graftlm.runs import read_json

    trained = read_json(run.train_marker).get("tokens_by_source", {}).get(source)
    if trained is None:
        sys.exit(f"vocab_words: {run.train_marker} does not say how many tokens of {source} training read")
    return counts * (trained / counts.sum())


def main() -> None:
    from graftlm.data.config import SourceConfig
    from graftlm.data.read import read_documents
    from graftlm.languages import fertility_unit
    from graftlm.recipe import load_recipe
    from graftlm.runs import RunDir
    from graftlm.vocab.init import vocab_rows

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--text", help="the eval.text set (default: the target language's)")
    parser.add_argument("--max-documents", type=int, default=None, help="the first N documents (default: the "
                                                                       "recipe's eval.max_documents)")
    args = parser.parse_args()
    for root in args.runs:
        if not (root / "recipe.yaml").is_file():
            sys.exit(f"vocab_words: {root}: not a run directory (no recipe.yaml)")
    reference = next((RunDir(r) for r in args.runs if vocab_rows(RunDir(r).start_model) is not None), None)
    if reference is None:
        sys.exit("vocab_words: no run starts from a vocabulary-extended model")
    recipe = load_recipe(reference.root / "recipe.yaml")
    name = args.text or recipe.target_language
    if name not in recipe.eval.text:
        sys.exit(f"vocab_words: {reference.root / 'recipe.yaml'}: eval.text has no set '{name}' "
                 f"(it has {', '.join(recipe.eval.text) or 'none'})")
    path = recipe.eval.text[name]
    limit = args.max_documents or recipe.eval.max_documents
    if fertility_unit(name) == "character":
        print(f"vocab_words: {name} is written without spaces: each group holds whole space-separated runs "
              f"(phrases or sentences), so the split by token frequency is coarse", file=sys.stderr)
    texts = list(read_documents(SourceConfig(paths=[str(path)], text_field=recipe.eval.text_field,
                                             txt_documents="line", max_documents=limit)))
    added = vocab_rows(reference.start_model)
    source = target_source(reference)
    read = times_read(reference, source, token_counts(reference.packed / source, added.rows))

    columns, labels = {}, None
    for number, root in enumerate(args.runs, 1):
        run = RunDir(root)
        for when, folder in (("0", run.start_model), ("end", run.model)):
            if not (folder / "config.json").is_file():
                continue
            print(f"  {number}.{when}: {folder}", file=sys.stderr)
            bits, pieces = word_bits(folder, texts)
            columns[f"{number}.{when}"] = bits
            if run.root == reference.root and labels is None:
                labels = groups(pieces, added.first_new, read)
    word_bytes = np.concatenate([[len(t[s:e].encode("utf-8")) for s, e in word_spans(t)] for t in texts])
    order = {label: i for doc in labels for i, label in doc}
    flat = np.array([label for doc in labels for _, label in doc])
    print(f"{name}: {len(texts)} documents, {word_bytes.sum():,} bytes; words grouped by how {reference.root}'s "
          f"tokenizer reads them ({added.new_tokens:,} new tokens) and how often its training read their rarest new "
          f"token (expected, from packed/{source}); bits per byte, columns RUN.0 (start) and RUN.end (trained):")
    for number, root in enumerate(args.runs, 1):
        print(f"  {number}: {root}")
    print(f"{'group':<28}{'share':>7}" + "".join(f"{c:>9}" for c in columns))
    flat_bits = [np.concatenate(bits) for bits in columns.values()]
    for group in [*sorted(order, key=order.get), "all"]:
        chosen = np.ones(len(flat), bool) if group == "all" else flat == group
        row = f"{group:<28}{word_bytes[chosen].sum() / word_bytes.sum():>7.1%}"
        row += "".join(f"{bits[chosen].sum() / word_bytes[chosen].sum():>9.4f}" for bits in flat_bits)
        print(row)


if __name__ == "__main__":
    main()
