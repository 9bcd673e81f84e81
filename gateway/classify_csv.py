"""`tiergate classify FILE.csv --column C`: score every row of a CSV through a gateway.

Rows go out as ClassifyBatch calls, a few in flight at once, and come back in
file order with label, score and tier columns added. Without --target an
embedded stack (inference child + in-process gateway on a free port) is used.
"""

from __future__ import annotations

import asyncio
import csv
import pathlib
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Callable

import grpc

from protos import classifier_pb2, classifier_pb2_grpc

if TYPE_CHECKING:
    from gateway.server import GatewayConfig

__all__ = ["run_classify"]

_IN_FLIGHT = 4  # batches in flight: enough to keep the model busy while results are written
_TIER_NAMES = {v.number: v.name.removeprefix("TIER_") for v in classifier_pb2.Tier.DESCRIPTOR.values}


def _read_rows(path: pathlib.Path, column: str) -> tuple[list[dict], list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        if column not in fields:
            raise ValueError(f"column {column!r} is not in {path} (its columns: {', '.join(fields) or 'none'})")
        return list(reader), fields


async def _score_chunk(stub, texts: list[str]) -> list[tuple[str, str, str]]:
    """(label, score, tier) per text; empty texts and texts the gateway refuses get an explanation."""
    out: list[tuple[str, str, str] | None] = [None] * len(texts)
    todo = [i for i, t in enumerate(texts) if t.strip()]
    for i, t in enumerate(texts):
        if not t.strip():
            out[i] = ("", "", "SKIPPED: empty text")
    try:
        reply = await stub.ClassifyBatch(classifier_pb2.ClassifyBatchRequest(texts=[texts[i] for i in todo]))
        results = list(reply.results)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        results = []  # one bad text fails a batch: score them one by one to isolate it
        for i in todo:
            try:
                results.append(await stub.Classify(classifier_pb2.ClassifyRequest(text=texts[i])))
            except grpc.aio.AioRpcError as one:
                if one.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                results.append(one.details())
    for i, r in zip(todo, results):
        out[i] = ("", "", f"INVALID: {r}") if isinstance(r, str) else (r.label, f"{r.score:.6f}", _TIER_NAMES[r.tier])
    return out


async def _classify_rows(target: str, texts: list[str], batch_size: int, progress: bool) -> list[tuple[str, str, str]]:
    from tqdm import tqdm

    chunks = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    results: list[list] = [None] * len(chunks)
    bar = tqdm(total=len(texts), unit="row", disable=not progress, file=sys.stderr)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        next_chunk = 0

        async def worker() -> None:
            nonlocal next_chunk
            while next_chunk < len(chunks):
                i, next_chunk = next_chunk, next_chunk + 1
                results[i] = await _score_chunk(stub, chunks[i])
                bar.update(len(chunks[i]))

        try:
            await asyncio.gather(*(worker() for _ in range(_IN_FLIGHT)))
        finally:
            bar.close()
    return [r for chunk in results for r in chunk]


async def run_classify(args, model_args: list[str], config_for: Callable[[list[str]], GatewayConfig]) -> None:
    """`tiergate classify` with its parsed flags; without --target it starts
    `tiergate inference MODEL_ARGS...` and an in-process gateway configured by
    config_for(inference addresses) (the CLI builds both from its flags)."""
    from gateway.server import GatewayServer
    from gateway.stack import InferenceProcess

    path = pathlib.Path(args.csv)
    rows, fields = _read_rows(path, args.column)
    texts = [row.get(args.column) or "" for row in rows]
    started = time.perf_counter()
    child = server = None
    target = args.target
    try:
        if target is None:
            child = InferenceProcess(model_args)
            await child.start()
            server = GatewayServer(config_for([child.address]))
            await server.start()
            target = server.address
        try:
            scored = await _classify_rows(target, texts, args.batch_size, not args.no_progress)
        except grpc.aio.AioRpcError as exc:
            raise RuntimeError(f"the gateway at {target} answered {exc.code().name}: {exc.details()}") from None
    finally:
        if server is not None:
            await server.stop()
        if child is not None:
            await child.stop()

    out_fields = fields + [f for f in ("label", "score", "tier") if f not in fields]
    out_path = args.output or str(path.with_suffix("")) + ".scored.csv"
    sink = sys.stdout if out_path == "-" else open(out_path, "w", newline="", encoding="utf-8")
    try:
        writer = csv.DictWriter(sink, fieldnames=out_fields)
        writer.writeheader()
        for row, (label, score, tier) in zip(rows, scored):
            writer.writerow({**row, "label": label, "score": score, "tier": tier})
    finally:
        if sink is not sys.stdout:
            sink.close()
    tiers = Counter(t.split(":")[0] for _, _, t in scored)
    summary = ", ".join(f"{n} {t}" for t, n in tiers.most_common())
    elapsed = time.perf_counter() - started
    print(f"classified {len(rows)} rows in {elapsed:.1f} s ({summary}) -> {out_path}", file=sys.stderr)
