"""Rebuild graftlm/assets/fineweb2/ from a copy of FineWeb2's repository files (github.com/huggingface/fineweb-2).

    python scripts/fineweb2_assets.py [../shared/data/fineweb2]

configs/<lang>.yml (1,929 files) become one mapping {lang: config} in configs.json.gz, and
rehydration/weights/up_to_{03..10}_reps.json one mapping {max repetitions: {lang: {cluster size: times}}} in
rehydration.json.gz: the same values, unchanged (tests/test_languages.py compares them with the source files when
they are present), in two files that the package reads at run time. Written byte-for-byte reproducibly.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parent.parent / "graftlm/assets/fineweb2"


def write_gzip_json(path: Path, data) -> None:
    raw = json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0, filename="") as out:
        out.write(raw)


def main() -> None:
    source = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared/data/fineweb2")
    configs = {path.stem: yaml.safe_load(path.read_text(encoding="utf-8"))
               for path in sorted((source / "configs").glob("*.yml"))}
    weights = {str(n): json.loads((source / f"rehydration/weights/up_to_{n:02d}_reps.json").read_text())
               for n in range(3, 11)}
    OUT.mkdir(parents=True, exist_ok=True)
    write_gzip_json(OUT / "configs.json.gz", configs)
    write_gzip_json(OUT / "rehydration.json.gz", weights)
    shutil.copyfile(source / "LICENSE", OUT / "LICENSE")
    print(f"{len(configs)} configs, rehydration weights for {len(weights['10'])} languages -> {OUT}")


if __name__ == "__main__":
    main()
