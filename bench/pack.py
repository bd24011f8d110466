"""Packing throughput (read + tokenise + write) against a bare `tokenizer(texts)` batch call, in one run.

    .venv/bin/python bench/pack.py [--data ../shared/data/vi/viwiki.jsonl]

Target: packing >= 0.8x the bare call's MB/s, peak RSS of the packing process < 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def pack_in_subprocess(data: str, tokenizer_dir: str, out: str) -> tuple[dict, float]:
    """Pack in a fresh process so that its peak RSS is the packer's alone."""
    code = (
        "import sys; from graftlm.data.config import SourceConfig; from graftlm.data.pack import pack_source\n"
        "pack_source('vi', SourceConfig(paths=[sys.argv[1]]), sys.argv[2], sys.argv[3])\n"
    )
    subprocess.run([sys.executable, "-c", code, data, tokenizer_dir, out], check=True)
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return json.loads((Path(out) / "manifest.json").read_text()), peak_gib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/vi/viwiki.jsonl"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from graftlm.data.config import SourceConfig
    from graftlm.data.read import read_documents
    from graftlm.models import load_tokenizer, save_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(load_tokenizer("smollm2-135m"), tmp + "/tok")
        # Pack first: a child forked from a parent that already holds the texts would count them in its RSS.
        started = time.perf_counter()
        manifest, peak_gib = pack_in_subprocess(args.data, tmp + "/tok", tmp + "/packed")
        end_to_end = manifest["bytes"] / 1e6 / (time.perf_counter() - started)  # with process start and imports
        packing = manifest["mb_per_s"]

        texts = list(read_documents(SourceConfig(paths=[args.data])))
        megabytes = sum(len(t.encode()) for t in texts) / 1e6
        tokenizer = AutoTokenizer.from_pretrained(tmp + "/tok")
        started = time.perf_counter()
        tokenizer(texts)
        bare = megabytes / (time.perf_counter() - started)
        started = time.perf_counter()
        tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        ceiling = megabytes / (time.perf_counter() - started)

    print(f"data: {args.data} ({megabytes:.1f} MB, {manifest['documents']} documents, {manifest['tokens']:,} tokens)")
    print(f"bare tokenizer(texts) batch call : {bare:6.2f} MB/s")
    print(f"graftlm packing (read+tok+write) : {packing:6.2f} MB/s   ({end_to_end:.2f} MB/s with process start-up)")
    print(f"Rust encode_batch_fast alone     : {ceiling:6.2f} MB/s   (the tokenizer's ceiling, no Python objects)")
    print(f"ratio packing / bare             : {packing / bare:6.2f}   (target >= 0.8)")
    print(f"packing peak RSS                 : {peak_gib:6.2f} GiB (target < 1 GiB)")


if __name__ == "__main__":
    main()
