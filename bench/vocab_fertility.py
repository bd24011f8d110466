"""Vocabulary extension: Vietnamese fertility (tokens per word) before and after, and whether English keeps its ids.

    .venv/bin/python bench/vocab_fertility.py [--data ../shared/data/vi/viwiki.jsonl] [--new-tokens 16000 8000 4000]
                                              [--ascii-tokens]

Trains the target tokenizer once (sized for the largest --new-tokens) on --data, extends the default base with each
size, and scores the bundled FLORES test sentences (data/eval/sib200). Target: Vietnamese <= 1.6 tokens per word
with <= 16k new tokens (the base: 3.46), English tokenised exactly as before (100% of documents).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EVAL = {"vi": REPO / "data/eval/sib200/vie_Latn/test.tsv", "en": REPO / "data/eval/sib200/eng_Latn/test.tsv"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/vi/viwiki.jsonl"))
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[16000, 8000, 4000])
    parser.add_argument("--ascii-tokens", action="store_true", help="also add tokens made only of ASCII letters")
    parser.add_argument("--min-frequency", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from graftlm.data.config import SourceConfig
    from graftlm.data.read import ReadStats, read_documents
    from graftlm.models import load_tokenizer, save_tokenizer
    from graftlm.vocab.extend import extend_tokenizer, train_target_tokenizer
    from graftlm.vocab.stage import TRAIN_VOCAB_PER_NEW_TOKEN, fertility_change, write_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        save_tokenizer(load_tokenizer("smollm2-135m"), base_dir)
        base_json = json.loads((base_dir / "tokenizer.json").read_text(encoding="utf-8"))
        base = AutoTokenizer.from_pretrained(base_dir)
        read = ReadStats()
        train_vocab = max(args.new_tokens) * TRAIN_VOCAB_PER_NEW_TOKEN + 1000
        started = time.perf_counter()
        trained = train_target_tokenizer(read_documents(SourceConfig(paths=[args.data]), stats=read), base_json,
                                         train_vocab, args.min_frequency)
        train_seconds = time.perf_counter() - started
        print(f"trained a {train_vocab:,}-token BPE on {read.bytes / 1e6:.1f} MB ({read.documents:,} documents) "
              f"in {train_seconds:.1f}s")
        print(f"{'new tokens':>10} {'added':>6} {'vi tok/word':>12} {'vi tok/byte':>12} {'en tok/word':>12} "
              f"{'en same ids':>12} {'extend s':>9}")
        results = []
        for new_tokens in sorted(args.new_tokens):
            started = time.perf_counter()
            extension = extend_tokenizer(base_json, trained, new_tokens, ascii_tokens=args.ascii_tokens)
            extend_seconds = time.perf_counter() - started
            merged = write_tokenizer(base_dir, extension, Path(tmp) / f"merged-{new_tokens}")
            change = {lang: fertility_change(str(path), base, merged) for lang, path in EVAL.items()}
            vi, en = change["vi"], change["en"]
            print(f"{new_tokens:>10,} {len(extension.tokens):>6,} "
                  f"{vi['before']['tokens_per_word']:.2f}->{vi['after']['tokens_per_word']:.3f} "
                  f"{vi['before']['tokens_per_byte']:.3f}->{vi['after']['tokens_per_byte']:.3f} "
                  f"{en['before']['tokens_per_word']:.2f}->{en['after']['tokens_per_word']:.3f} "
                  f"{en['identical_documents']:>11.1%} {extend_seconds:>9.1f}")
            results.append({"new_tokens": new_tokens, "added": len(extension.tokens), "fertility": change,
                            "extend_seconds": round(extend_seconds, 2)})
        print(json.dumps({"data": args.data, "bytes": read.bytes, "train_vocab": train_vocab,
                          "train_seconds": round(train_seconds, 1), "ascii_tokens": args.ascii_tokens,
                          "results": results}, ensure_ascii=False))


if __name__ == "__main__":
    main()
