"""The seed documents' "approach 1", as a baseline to measure tiergate against:
one process, a transformers text-classification pipeline, texts in batches.

    python -m inference.pipeline_baseline --model DIR --texts FILE [--batch-size 8] [--limit N]

Reads one text per line, scores them in batches of --batch-size, and prints
one JSON line: texts, seconds (scoring only; loading is load_seconds),
texts_per_s, rss_mb (this process's VmRSS at the end) and peak_rss_mb
(VmHWM). `tiergate bench --compare` runs it on the texts of its miss scenario.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

__all__ = ["main", "run_pipeline"]


def _status_mb(field: str) -> float | None:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def read_texts(path: Path, limit: int | None) -> list[str]:
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return texts[:limit] if limit else texts


def run_pipeline(model: str, texts: list[str], batch_size: int) -> dict:
    from transformers import pipeline  # here, not at import time: it loads torch

    t0 = time.perf_counter()
    classify = pipeline("text-classification", model=model, tokenizer=model, device=-1)
    load_s = time.perf_counter() - t0
    start = time.perf_counter()
    labels: dict[str, int] = {}
    for i in range(0, len(texts), batch_size):
        for answer in classify(texts[i:i + batch_size], batch_size=batch_size, truncation=True):
            labels[answer["label"]] = labels.get(answer["label"], 0) + 1
    seconds = time.perf_counter() - start
    return {
        "texts": len(texts), "seconds": round(seconds, 3), "texts_per_s": len(texts) / seconds if seconds else None,
        "rss_mb": _status_mb("VmRSS"), "peak_rss_mb": _status_mb("VmHWM"), "load_seconds": round(load_s, 3),
        "batch_size": batch_size, "model": model, "labels": labels, "pid": os.getpid(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m inference.pipeline_baseline", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (or hub id)")
    p.add_argument("--texts", required=True, type=Path, metavar="FILE", help="one text per line")
    p.add_argument("--batch-size", type=int, default=8, help="texts per pipeline call (default: %(default)s)")
    p.add_argument("--limit", type=int, help="score only the first N texts")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be >= 1, got {args.limit}")
    texts = read_texts(args.texts, args.limit)
    if not texts:
        p.error(f"no texts in {args.texts}")
    print(json.dumps(run_pipeline(args.model, texts, args.batch_size)), flush=True)


if __name__ == "__main__":
    main()
