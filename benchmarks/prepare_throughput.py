"""`tailorgpt prepare` throughput and peak memory on a generated corpus.

Generates N MB of JSONL and .txt documents (sentences of the bundled corpus recombined at
random, English and Chinese, plus some exact and near duplicates), then prepares them with
the default settings (encoding detection, ftfy, dedup with MinHash LSH) and reports MB/s
and the process's peak resident memory.

  .venv/bin/python benchmarks/prepare_throughput.py --megabytes 200 --workdir /tmp/tg-prep
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import shutil
import time
from pathlib import Path

from training.prepare import PrepareArgs, prepare, read_documents

REPO = Path(__file__).resolve().parent.parent
FILE_BYTES = 4 << 20


def sentences() -> list[str]:
    text = "\n".join(read_documents([REPO / "samples" / "corpus"]))
    return [s.strip() for s in re.split(r"(?<=[.!?。！？])\s*", text) if len(s.strip()) > 8]


def generate(directory: Path, megabytes: int, seed: int = 0) -> int:
    """Write the corpus file by file (never all in memory); return its size in bytes."""
    rng = random.Random(seed)
    pool = sentences()
    written, number, previous = 0, 0, ""
    while written < megabytes << 20:
        path = directory / (f"part-{number:04d}.jsonl" if number % 4 else f"notes-{number:04d}.txt")
        with path.open("w", encoding="utf-8") as f:
            size = 0
            limit = FILE_BYTES if path.suffix == ".jsonl" else 1  # a .txt file: one document
            while size < limit:
                doc = " ".join(rng.choice(pool) for _ in range(rng.randint(5, 30)))
                if rng.random() < 0.05 and previous:  # some exact and near duplicates
                    doc = previous if rng.random() < 0.5 else previous + " " + rng.choice(pool)
                line = (
                    json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                    if path.suffix == ".jsonl"
                    else doc + "\n\n"
                )
                f.write(line)
                size += len(line.encode())
                previous = doc
        written += path.stat().st_size
        number += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tailorgpt-prepare-bench"))
    args = parser.parse_args()
    corpus, output = args.workdir / "corpus", args.workdir / "dataset"
    shutil.rmtree(args.workdir, ignore_errors=True)
    corpus.mkdir(parents=True)
    size = generate(corpus, args.megabytes)
    started = time.perf_counter()
    report = prepare(PrepareArgs(inputs=[corpus], output_dir=output))
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"input: {size / 2**20:.0f} MiB in {len(list(corpus.iterdir()))} files, "
        f"{report['read']['documents']:,} documents"
    )
    print(
        f"kept {report['kept']['documents']:,}; dropped duplicate "
        f"{report['dropped']['duplicate']['documents']:,}, near-duplicate "
        f"{report['dropped']['near_duplicate']['documents']:,}"
    )
    print(
        f"time: {seconds:.1f} s, throughput: {size / 2**20 / seconds:.2f} MiB/s, "
        f"peak RSS: {peak_mib:.0f} MiB"
    )


if __name__ == "__main__":
    main()
