"""Curation of the 30 MB Vietnamese Wikipedia sample with the demo recipe's `curate:` settings.

    .venv/bin/python bench/curate.py [--data ../shared/data/vi/viwiki.jsonl] [--set curate.workers=2 ...]

Prints the wall time, MB/s, what each step removed, and how many of the bot-made stub articles were caught.

A stub is recognised by its lead sentence, the templates that bots filled in by the thousand on Vietnamese
Wikipedia (species/genus "X là một loài/chi ... trong họ/thuộc bộ ...", asteroids "X là một tiểu hành tinh",
administrative units "X là một xã/huyện/đô thị thuộc ... Dân số/diện tích ...", calendar years "là một năm
thường/nhuận"), AND by a body (lines that are not section headers) shorter than 1,000 characters: a long article
that happens to open the same way is not a stub.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

STUB_TEMPLATES = {
    "species": re.compile(r"^[^\n]{0,120}? là một (loài|chi|họ|phân loài)\b[^\n]{0,80}?"
                         r"\b(trong|thuộc) (họ|chi|bộ)\b"),
    "asteroid": re.compile(r"^[^\n]{0,120}? là một tiểu hành tinh"),
    "place": re.compile(r"^[^\n]{0,120}? là một (xã|đô thị|huyện|thị trấn|làng|tổng|quận)\b[^\n]{0,120}?"
                        r"\b(thuộc|của|ở|trong)\b[^\n]*\.\s*(\w+ (có diện tích|có dân số)|Dân số|Huyện có|Xã có)"),
    "year": re.compile(r"^[^\n]{0,80}? là một năm (thường|nhuận)"),
}
STUB_MAX_BODY = 1000


def stub_kind(text: str) -> str | None:
    body = sum(len(line) for line in text.split("\n") if line.strip() and not line.strip().startswith("=="))
    if body >= STUB_MAX_BODY:
        return None
    return next((kind for kind, template in STUB_TEMPLATES.items() if template.search(text)), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/vi/viwiki.jsonl"))
    parser.add_argument("--recipe", default=str(REPO / "recipes/demo-vi.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    from graftlm.curate.stage import run_curate
    from graftlm.data.config import SourceConfig
    from graftlm.data.read import read_records
    from graftlm.recipe import load_recipe
    from graftlm.runs import RunDir

    data = str(Path(args.data).resolve())
    recipe = load_recipe(args.recipe, [f"sources.vi.paths=[{data}]", "curate.sources=[vi]", *args.overrides])
    stubs = {f"{r.path}:{r.line}": kind for r in read_records(SourceConfig(paths=[data]))
             if (kind := stub_kind(r.text))}

    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir.for_recipe(recipe, tmp)
        started = time.perf_counter()
        stats = run_curate(recipe, run)["vi"]
        wall = time.perf_counter() - started
        caught: Counter = Counter()
        for path in (run.curated / "excluded/vi").rglob("*.jsonl.gz"):
            step = path.relative_to(run.curated / "excluded/vi").parts[0]
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    if (kind := stubs.get(json.loads(line)["id"])) is not None:
                        caught[kind, step] += 1

    megabytes = stats["input"]["bytes"] / 1e6
    print(f"data: {data} ({stats['input']['documents']:,} documents, {megabytes:.1f} MB of text)")
    print(f"settings: {args.recipe} curate section {' '.join(args.overrides)} "
          f"({recipe.curate.executor}, {recipe.curate.workers} workers)")
    print(f"wall time: {wall:.1f}s  ({megabytes / wall:.2f} MB/s end to end; stages: "
          + ", ".join(f"{k} {v:.1f}s" for k, v in stats["seconds"].items() if k != "total") + ")")
    print(f"\n{'step':<20}{'docs in':>9}{'docs out':>10}{'MB out':>9}  removed (reason: documents)")
    for step in stats["steps"]:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(step.get("dropped", {}).items(), key=lambda x: -x[1]))
        print(f"{step['step']:<20}{step.get('documents_in', ''):>9}{step['documents_out']:>10}"
              f"{step['bytes_out'] / 1e6:>9.2f}  {reasons}")
    languages = ", ".join(f"{lang} {v['documents']}" for lang, v in list(stats["languages"].items())[:6])
    print(f"\nlanguages (documents): {languages}")
    print(f"cluster sizes (kept documents): {stats['cluster_sizes']}")
    total = Counter(stubs.values())
    print(f"\nbot-made stubs in the input: {sum(total.values())} ({', '.join(f'{k} {v}' for k, v in total.items())})")
    for kind in total:
        by_step = {step: n for (k, step), n in caught.items() if k == kind}
        print(f"  {kind:<9} caught {sum(by_step.values()):>4} / {total[kind]:<4} by {by_step}")
    print(f"  all       caught {sum(caught.values()):>4} / {sum(total.values())}")


if __name__ == "__main__":
    main()
