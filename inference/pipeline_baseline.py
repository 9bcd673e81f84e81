"""The seed documents' "approach 1", as a baseline to measure tiergate against:
one process, a transformers text-classification pipeline, texts in batches.

    python -m inference.pipeline_baseline --model DIR --texts FILE [--batch-size 8] [--limit N]
    python -m inference.pipeline_baseline --model DIR --texts FILE --bare-forward N [--warmup 5] [--quantize on] [--runtime torch]
    python -m inference.pipeline_baseline --model DIR --texts FILE --model-alone SECONDS [--quantize on] [--runtime torch]

Reads one text per line, scores them in batches of --batch-size, and prints
one JSON line: texts, seconds (scoring only; loading is load_seconds),
texts_per_s, rss_mb (this process's VmRSS at the end) and peak_rss_mb
(VmHWM). `tiergate bench --compare` runs it on the texts of its miss scenario.

--bare-forward N is the floor a single miss is measured against: the model
loaded with the project's own loader (inference.runtime.load_classifier, with
--quantize and --runtime as the server takes them), then --warmup texts and N texts
scored one at a time (tokenize + forward of one text, nothing else), timed
each; prints one JSON line with p50/p90/p99 ms of one pass. `tiergate bench`
runs it (scenario miss-idle) on the texts the gateway was sent, while idle.

--model-alone SECONDS is the ceiling the miss scenario is measured against:
the model as the inference service serves it (the same loader, lanes,
threads per lane and texts per pass), every lane kept busy from a thread of
its own with the next batch of texts (tokenize + forward, nothing else: no
gRPC, no queue, no cache), for SECONDS after a warm-up pass per lane; prints
texts/s. Its passes are cut as the service cuts them: texts of similar token
counts together (within each --group-window texts), so the ceiling pads no
more than the service does. `tiergate bench` runs it in the miss scenario on the miss texts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
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


def run_bare_forward(model: str, texts: list[str], warmup: int, *, quantize: bool | None, runtime: str,
                     device: str) -> dict:
    from inference.model import ModelConfig
    from inference.runtime import load_classifier  # the runtime the stack picks for the same flags

    t0 = time.perf_counter()
    classifier = load_classifier(ModelConfig(source=model, quantize=quantize, runtime=runtime, device=device))
    info = classifier.info
    load_s = time.perf_counter() - t0

    def timed(text: str) -> float:
        start = time.perf_counter()
        classifier.score([text])
        return time.perf_counter() - start

    # In a worker thread, as the inference service calls its model (off the
    # event loop; load() already ran torch in the main thread, as the server's
    # load does). It matters on a shared machine: with one OpenMP team whose
    # threads fit the cores, libgomp spin-waits at full count, and one core
    # busy with another process then turns a pass of a few ms into hundreds
    # (GOMP_SPINCOUNT=1000 cures it, which shows the cause); with a second
    # team, as here and in the server, libgomp uses its throttled spin.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bare-forward") as pool:
        for text in texts[:warmup]:
            pool.submit(timed, text).result()
        times = sorted(pool.submit(timed, text).result() for text in texts[warmup:])

    def ms(p: float) -> float:
        return round(times[int(p * (len(times) - 1))] * 1000, 3)

    return {
        "mode": "bare-forward", "texts": len(times), "warmup": warmup, "p50_ms": ms(0.5), "p90_ms": ms(0.9),
        "p99_ms": ms(0.99), "min_ms": ms(0.0), "max_ms": ms(1.0),
        "mean_ms": round(sum(times) / len(times) * 1000, 3), "dtype": info.dtype, "device": info.device,
        "runtime": info.graph, "threads": info.threads, "in": "worker thread", "load_seconds": round(load_s, 3), "rss_mb": _status_mb("VmRSS"),
        "model": model, "model_id": info.model_id, "pid": os.getpid(),
    }


def run_model_alone(model: str, texts: list[str], seconds: float, *, quantize: bool | None, runtime: str,
                    device: str, group_window: int = 32) -> dict:
    import itertools
    import threading

    from inference.batcher import BatcherConfig
    from inference.model import ModelConfig
    from inference.runtime import load_classifier

    t0 = time.perf_counter()
    classifier = load_classifier(ModelConfig(source=model, quantize=quantize, runtime=runtime, device=device))
    info = classifier.info
    load_s = time.perf_counter() - t0
    per_pass = BatcherConfig().for_model(info).max_batch  # the service's default texts per pass
    # Passes cut as the service cuts them from a queue: texts of similar
    # token counts together, here within each window of `group_window`
    # texts in file order (the service groups the texts waiting at once).
    tokens = {text: classifier.count_tokens(text) for text in texts}
    classifier.drop_counted()  # every timed pass tokenizes its texts itself
    ordered = []
    for start in range(0, len(texts), group_window):
        ordered += sorted(texts[start:start + group_window], key=tokens.__getitem__)
    batches = [ordered[i:i + per_pass] for i in range(0, len(ordered) - per_pass + 1, per_pass)]
    if not batches:
        raise ValueError(f"--model-alone needs at least {per_pass} texts, got {len(texts)}")
    feed = itertools.cycle(batches)
    lock = threading.Lock()
    scored = [0] * info.lanes
    stop_at = [0.0]

    def lane(index: int) -> None:
        try:
            classifier.forward(classifier.tokenize(batches[index % len(batches)]))  # warm-up, untimed
        except BaseException:
            barrier.abort()  # the other lanes and the timer must not wait for this one
            raise
        barrier.wait()  # every lane warm
        barrier.wait()  # the end time is set
        while time.perf_counter() < stop_at[0]:
            with lock:
                batch = next(feed)
            classifier.forward(classifier.tokenize(batch))
            scored[index] += len(batch)

    barrier = threading.Barrier(info.lanes + 1)
    with concurrent.futures.ThreadPoolExecutor(info.lanes, thread_name_prefix="model-alone") as pool:
        futures = [pool.submit(lane, i) for i in range(info.lanes)]
        try:
            barrier.wait()
            start = time.perf_counter()
            stop_at[0] = start + seconds  # before the lanes go: one that saw no end time would stop at once
            barrier.wait()
        except threading.BrokenBarrierError:
            for future in futures:
                future.result()  # raises what broke it
            raise
        for future in futures:
            future.result()
        took = time.perf_counter() - start
    return {
        "mode": "model-alone", "texts": sum(scored), "seconds": round(took, 3), "texts_per_s": sum(scored) / took,
        "lanes": info.lanes, "threads": info.threads, "texts_per_pass": per_pass, "group_window": group_window,
        "padding": round(sum(len(b) * max(tokens[t] for t in b) for b in batches)
                         / max(1, sum(tokens[t] for b in batches for t in b)), 3),
        "dtype": info.dtype,
        "device": info.device, "runtime": info.graph, "load_seconds": round(load_s, 3), "rss_mb": _status_mb("VmRSS"),
        "model": model, "model_id": info.model_id, "pid": os.getpid(),
    }


_QUANTIZE = {"auto": None, "on": True, "off": False}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m inference.pipeline_baseline", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (or hub id)")
    p.add_argument("--texts", required=True, type=Path, metavar="FILE", help="one text per line")
    p.add_argument("--batch-size", type=int, default=8, help="texts per pipeline call (default: %(default)s)")
    p.add_argument("--limit", type=int, help="score only the first N texts")
    p.add_argument("--bare-forward", type=int, metavar="N", help="instead: time N single texts (after --warmup "
                   "more) through inference.runtime.load_classifier (the runtime the stack picks), one forward pass each")
    p.add_argument("--warmup", type=int, default=5, help="with --bare-forward: untimed texts first, taken from "
                   "the start of the file (default: %(default)s)")
    p.add_argument("--model-alone", type=float, metavar="SECONDS", help="instead: keep every lane of the model, "
                   "as the inference service serves it, busy with batches of the texts for SECONDS; texts/s")
    p.add_argument("--group-window", type=int, default=32, metavar="N", help="with --model-alone: cut passes "
                   "from texts grouped by token count within each N texts, as the service groups the texts "
                   "waiting at once (default: %(default)s, the bench's misses in flight; 1: file order)")
    p.add_argument("--quantize", choices=("auto", "on", "off"), default="auto", help="with --bare-forward or "
                   "--model-alone: as `tiergate serve --quantize` (default: %(default)s)")
    p.add_argument("--runtime", choices=("auto", "torch", "onnxruntime"), default="auto", help="with --bare-forward "
                   "or --model-alone: as `tiergate serve --runtime` (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="with --bare-forward or --model-alone: cpu, cuda, cuda:N or auto "
                   "(default: %(default)s)")
    args = p.parse_args(argv)
    if args.model_alone is not None:
        if not args.model_alone > 0:
            p.error(f"--model-alone must be > 0 seconds, got {args.model_alone}")
        texts = read_texts(args.texts, args.limit)
        if args.group_window < 1:
            p.error(f"--group-window must be >= 1, got {args.group_window}")
        result = run_model_alone(args.model, texts, args.model_alone, quantize=_QUANTIZE[args.quantize],
                                 runtime=args.runtime, device=args.device, group_window=args.group_window)
        print(json.dumps(result), flush=True)
        return
    if args.bare_forward is not None:
        if args.bare_forward < 1 or args.warmup < 0:
            p.error(f"--bare-forward must be >= 1 and --warmup >= 0, got {args.bare_forward} and {args.warmup}")
        texts = read_texts(args.texts, args.warmup + args.bare_forward)
        if len(texts) < args.warmup + args.bare_forward:
            p.error(f"{args.texts} has {len(texts)} texts; --warmup {args.warmup} + --bare-forward "
                    f"{args.bare_forward} need {args.warmup + args.bare_forward}")
        result = run_bare_forward(args.model, texts, args.warmup, quantize=_QUANTIZE[args.quantize], runtime=args.runtime, device=args.device)
        print(json.dumps(result), flush=True)
        return
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
