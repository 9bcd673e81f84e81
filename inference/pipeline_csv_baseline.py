"""The seed documents' CSV job, as a baseline for `tiergate classify`: one
process reads a CSV, scores one column with a transformers text-classification
pipeline and writes the rows again with label and score added.

    python -m inference.pipeline_csv_baseline --model DIR --input IN.csv --column description
        --output OUT.csv [--batch-size 8] [--as-written]

Texts go to the pipeline in lists of --batch-size. --as-written calls it the
way the seed documents' script does, on each list without batch_size, so the
pipeline runs one text per forward pass; without it the same lists are run
with batch_size=--batch-size ("made fair"). The output appears complete or not
at all (written beside it, then renamed), so a parent that times "until the
output file exists" times the whole job. Prints one JSON line: rows, seconds
(scoring only), load_seconds, read_seconds, write_seconds, total_seconds (from
reading the input to the rename), rss_mb (VmRSS at the end) and peak_rss_mb (VmHWM).
`tiergate bench --scenarios classify` runs it both ways.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

from inference.pipeline_baseline import _status_mb

__all__ = ["main", "score_csv"]


def _read(path: Path, column: str) -> tuple[list[dict[str, str]], list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        if column not in fields:
            raise SystemExit(f"column {column!r} is not in {path} (its columns: {', '.join(fields) or 'none'})")
        return list(reader), fields


def _write(path: Path, rows: list[dict[str, str]], fields: list[str]) -> None:
    part = path.with_name(path.name + ".part")
    with part.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields + [f for f in ("label", "score") if f not in fields])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(part, path)  # the output exists only once it is whole


def score_csv(model: str, source: Path, column: str, output: Path, *, batch_size: int, as_written: bool) -> dict:
    t_start = time.perf_counter()
    rows, fields = _read(source, column)
    read_s = time.perf_counter() - t_start

    from transformers import pipeline  # here, not at import time: it loads torch

    t0 = time.perf_counter()
    classify = pipeline("text-classification", model=model, tokenizer=model, device=-1)
    load_s = time.perf_counter() - t0

    start = time.perf_counter()
    texts = [row.get(column) or "" for row in rows]
    labels: dict[str, int] = {}
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        # As written, a list without batch_size: the pipeline loops over it one text at a time.
        answers = classify(chunk) if as_written else classify(chunk, batch_size=batch_size)
        for row, answer in zip(rows[i:i + batch_size], answers):
            row["label"], row["score"] = answer["label"], f"{answer['score']:.6f}"
            labels[answer["label"]] = labels.get(answer["label"], 0) + 1
    seconds = time.perf_counter() - start

    t1 = time.perf_counter()
    _write(output, rows, fields)
    write_s = time.perf_counter() - t1
    return {
        "rows": len(rows), "seconds": round(seconds, 3), "rows_per_s": len(rows) / seconds if seconds else None,
        "load_seconds": round(load_s, 3), "read_seconds": round(read_s, 3), "write_seconds": round(write_s, 3),
        "total_seconds": round(time.perf_counter() - t_start, 3), "rss_mb": _status_mb("VmRSS"),
        "peak_rss_mb": _status_mb("VmHWM"), "batch_size": batch_size, "as_written": as_written, "model": model,
        "labels": labels, "pid": os.getpid(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m inference.pipeline_csv_baseline", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (or hub id)")
    p.add_argument("--input", required=True, type=Path, metavar="IN.csv")
    p.add_argument("--column", required=True, help="the column holding the text")
    p.add_argument("--output", required=True, type=Path, metavar="OUT.csv")
    p.add_argument("--batch-size", type=int, default=8, help="texts per pipeline call (default: %(default)s)")
    p.add_argument("--as-written", action="store_true",
                   help="call the pipeline on each list without batch_size (one text per forward pass)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.input.is_file():
        p.error(f"no such file: {args.input}")
    result = score_csv(args.model, args.input, args.column, args.output, batch_size=args.batch_size,
                       as_written=args.as_written)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
