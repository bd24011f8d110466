"""Vocabulary extension for any language: fertility before and after, and whether English keeps its ids.

    .venv/bin/python bench/vocab_fertility.py [--lang vi] [--data ../shared/data/vi/viwiki.jsonl]
                                              [--new-tokens 16000 8000 4000] [--replay-ratio 4] [--max-replay-change 1e-4]
                                              [--replay 'data/en/*.jsonl'] [--train-bytes 100000000]

Trains the target tokenizer once (sized for the largest --new-tokens) on --data, extends the default base with each
size under the replay check of `graft vocab` (--replay: the replay text it is measured on, as the recipe's replay
sources; --replay-ratio 0 switches it off), and scores the FLORES test sentences of the language and of English (data/eval/sib200, else
../shared/data/eval/sib200). Fertility is per word, or per character for a language written without spaces.
Targets: Vietnamese <= 1.6 tokens per word with <= 16k new tokens (the base: 3.46); English documents tokenised
as before >= 99%.
"""

from __future__ import annotations

import argparse
import glob
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIB200 = [REPO / "data/eval/sib200", REPO.parent / "shared/data/eval/sib200"]


def flores(lang: str) -> Path:
    """The FLORES/SIB-200 test file of a language (folders are named like vie_Latn, zho_Hans)."""
    from graftlm.languages import same_language

    for root in SIB200:
        for folder in sorted(root.glob("*_*")):
            if same_language(folder.name, lang) and (folder / "test.tsv").is_file():
                return folder / "test.tsv"
    raise SystemExit(f"no FLORES test set for '{lang}' under {', '.join(map(str, SIB200))}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lang", default="vi", help="the target language (any code graftlm knows)")
    parser.add_argument("--data", nargs="+", help="target text (default: ../shared/data/<lang>/*.jsonl)")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[16000, 8000, 4000])
    parser.add_argument("--replay-ratio", type=float, default=4.0)
    parser.add_argument("--max-replay-change", type=float, default=1e-4)
    parser.add_argument("--replay", nargs="+", default=[str(REPO / "data/en/*.jsonl")])
    parser.add_argument("--replay-bytes", type=int, default=20_000_000)
    parser.add_argument("--train-bytes", type=int, default=100_000_000)
    parser.add_argument("--min-frequency", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from graftlm.data.config import SourceConfig
    from graftlm.data.read import ReadStats, read_documents
    from graftlm.languages import language
    from graftlm.models import load_tokenizer, save_tokenizer
    from graftlm.vocab.extend import extend_tokenizer, pre_token_counts, token_shares, train_target_tokenizer
    from graftlm.vocab.stage import SAMPLE_BYTES, TRAIN_VOCAB_PER_NEW_TOKEN, fertility_change, write_tokenizer

    target = language(args.lang)
    data = args.data or sorted(glob.glob(str(REPO.parent / f"shared/data/{args.lang}/*.jsonl")))
    evals = {target.code: flores(target.code), "en": flores("en")}

    def limited(paths: list[str], limit: int, read: ReadStats):
        for text in read_documents(SourceConfig(paths=paths), stats=read):
            yield text
            if read.bytes >= limit:
                return

    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        save_tokenizer(load_tokenizer("smollm2-135m"), base_dir)
        base_json = json.loads((base_dir / "tokenizer.json").read_text(encoding="utf-8"))
        base = AutoTokenizer.from_pretrained(base_dir)
        read, replay_read = ReadStats(), ReadStats()
        train_vocab = max(args.new_tokens) * TRAIN_VOCAB_PER_NEW_TOKEN + 1000
        started = time.perf_counter()
        trained = train_target_tokenizer(limited(data, args.train_bytes, read), base_json, train_vocab,
                                         args.min_frequency)
        train_seconds = time.perf_counter() - started
        replay = shares = None
        if args.replay_ratio:
            replay = pre_token_counts(limited(args.replay, args.replay_bytes, replay_read), base_json)
            shares = token_shares(list(limited(data, SAMPLE_BYTES, ReadStats())), trained, base_json)
        print(f"{target.name} ({target.code}, {target.fineweb2}): trained a {train_vocab:,}-token BPE on "
              f"{read.bytes / 1e6:.1f} MB ({read.documents:,} documents) in {train_seconds:.1f}s; replay check on "
              f"{replay_read.bytes / 1e6:.1f} MB, replay ratio {args.replay_ratio:g}, max change {args.max_replay_change:g}")
        unit = "word" if target.spaces else "char"
        print(f"{'new tokens':>10} {'added':>6} {f'tok/{unit}':>13} {'tok/byte':>12} {'en tok/word':>12} "
              f"{'en same ids':>12} {'skipped: replay':>16} {'extend s':>9}")
        results = []
        for new_tokens in sorted(args.new_tokens):
            started = time.perf_counter()
            extension = extend_tokenizer(base_json, trained, new_tokens, replay, shares, args.replay_ratio,
                                         args.max_replay_change)
            extend_seconds = time.perf_counter() - started
            merged = write_tokenizer(base_dir, extension, Path(tmp) / f"merged-{new_tokens}")
            change = {lang: fertility_change(str(path), base, merged, lang=lang) for lang, path in evals.items()}
            tgt, en = change[target.code], change["en"]
            per = f"tokens_per_{tgt['unit']}"
            print(f"{new_tokens:>10,} {len(extension.tokens):>6,} "
                  f"{tgt['before'][per]:>6.2f}->{tgt['after'][per]:<6.3f} "
                  f"{tgt['before']['tokens_per_byte']:.3f}->{tgt['after']['tokens_per_byte']:.3f} "
                  f"{en['before']['tokens_per_word']:.2f}->{en['after']['tokens_per_word']:.3f} "
                  f"{en['identical_documents']:>11.1%} {extension.skipped.get('changes_replay', 0):>16,} "
                  f"{extend_seconds:>9.1f}")
            results.append({"new_tokens": new_tokens, "added": len(extension.tokens), "fertility": change,
                            "skipped": extension.skipped, "replay": extension.replay,
                            "extend_seconds": round(extend_seconds, 2)})
        print(json.dumps({"lang": target.code, "data": data, "bytes": read.bytes, "train_vocab": train_vocab,
                          "train_seconds": round(train_seconds, 1), "replay_ratio": args.replay_ratio,
                          "max_replay_change": args.max_replay_change,
                          "replay_bytes": replay_read.bytes, "results": results}, ensure_ascii=False))


if __name__ == "__main__":
    main()
