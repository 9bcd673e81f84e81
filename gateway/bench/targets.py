"""The servers a bench run talks to: the tiergate stack (started here or given
with --target), and the baselines gostub and the trivial grpc.aio server."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from gateway.bench.procs import RssSampler, free_port, start_server
from gateway.children import Child
from protos import classifier_pb2, classifier_pb2_grpc
from protos.security import ClientSecurity

__all__ = ["Target", "start_stack", "attach", "start_gostub", "start_trivial", "read_stats", "read_settled_stats",
           "counter_diff", "TIER_KEYS"]

# The counters that say where answers came from; GetStats may carry more (all are kept in bench.json).
# "joined": callers answered by another caller's model call for the same text (single-flight).
TIER_KEYS = (("L1", "hits_l1"), ("L2", "hits_l2"), ("L3", "hits_l3"), ("model", "model_texts"),
             ("joined", "singleflight_joined"))


@dataclass
class Target:
    name: str                     # "tiergate", "gostub", "trivial-aio"
    address: str
    pid: int | None               # root of the process tree whose RSS is summed; None: RSS n/a
    child: Child | None = None    # set when bench started it (and so stops it)
    info: dict = field(default_factory=dict)
    security: ClientSecurity | None = None  # TLS and token towards it (--target); None: plaintext, no token

    def sampler(self) -> RssSampler:
        return RssSampler(self.pid)

    def stop(self) -> None:
        if self.child is not None:
            code = self.child.stop()
            self.info["exit_status"] = code


def start_stack(*, model: str | None, workers: int | None, lmdb_path: Path, serve_args: tuple[str, ...],
                log_path: Path) -> Target:
    argv = [sys.executable, "-m", "gateway", "serve", "--port", "0", "--lmdb-path", str(lmdb_path)]
    if model:
        argv += ["--model", model]
    if workers is not None:  # only when asked: serve's default stays serve's business
        argv += ["--workers", str(workers)]
    metrics_port = None
    if "--metrics-port" not in serve_args:  # metrics on, as served by default, on a port of its own
        metrics_port = free_port()
        argv += ["--metrics-port", str(metrics_port)]
    argv += list(serve_args)
    # The first start may build the default model (about a minute here): a long timeout.
    child = start_server("tiergate serve", argv, log_path, ready_timeout_s=900)
    return Target("tiergate", child.address, child.pid, child,
                  info={"started_by_bench": True, "argv": argv, "ready_line": child.ready_line, "log": str(log_path),
                        "metrics_port": metrics_port})


def attach(address: str, pid: int | None, security: ClientSecurity | None = None) -> Target:
    return Target("tiergate", address, pid, info={"started_by_bench": False}, security=security)


def start_gostub(path: str, log_path: Path) -> Target:
    address = f"127.0.0.1:{free_port()}"  # gostub cannot take port 0 and tell us
    child = start_server("gostub", [path, "-addr", address], log_path, ready_timeout_s=30, address=address)
    return Target("gostub", address, child.pid, child, info={"argv": child.argv})


def start_trivial(log_path: Path) -> Target:
    argv = [sys.executable, "-m", "gateway.bench.trivial_server", "--port", "0"]
    child = start_server("trivial grpc.aio server", argv, log_path, ready_timeout_s=60)
    return Target("trivial-aio", child.address, child.pid, child, info={"argv": argv})


def read_stats(address: str, security: ClientSecurity | None = None) -> dict | None:
    """GatewayAdmin.GetStats: the gateway's counters (summed over its workers), or None when not served."""
    security = security or ClientSecurity()
    with security.channel(address) as channel:
        try:
            reply = classifier_pb2_grpc.GatewayAdminStub(channel).GetStats(classifier_pb2.GetStatsRequest(), timeout=10,
                                                                           metadata=security.metadata)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE,
                              grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            raise
    return {"counters": dict(reply.counters), "model": reply.model, "workers": reply.workers,
            "model_dtype": reply.model_dtype, "model_device": reply.model_device}


def _answer_counts(stats: dict) -> dict[str, int]:
    return {k: v for k, v in stats["counters"].items()
            if k.startswith(("hits_", "calls_", "model_", "misses", "singleflight", "memo_", "stream_"))}


def read_settled_stats(address: str, *, settle_s: float = 0.5, timeout_s: float = 5.0,
                       security: ClientSecurity | None = None) -> dict | None:
    """GetStats once the counters stop moving. With several workers, each
    publishes its counters a few times a second and GetStats adds the others'
    latest snapshots, so right after a load the sum lags (by more when the
    workers' loops are busy): read until two reads settle_s apart agree."""
    prev = read_stats(address, security)
    deadline = time.monotonic() + timeout_s
    while prev is not None and time.monotonic() < deadline:
        time.sleep(settle_s)
        cur = read_stats(address, security)
        if cur is None or _answer_counts(cur) == _answer_counts(prev):
            return cur
        prev = cur
    return prev


def counter_diff(before: dict | None, after: dict | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    keys = set(before["counters"]) | set(after["counters"])
    return {k: after["counters"].get(k, 0) - before["counters"].get(k, 0) for k in sorted(keys)}
