"""The gateway's Prometheus metrics: one scrape per host, summed over its workers.

Counting is plain (protos.metrics says why): the layers' own counters, plus
CallMetrics for every RPC. Each worker publishes its samples with its
counters (gateway.stats_board); worker 0 serves /metrics and adds them up at
scrape time, on its event loop (never racing the code that counts), plus what
is one per host: L2's size (one LMDB for every worker), the model's info,
and under `serve` the inference child's own samples (asked over its socket).

A worker that dies (or is restarted, with a new pid) leaves its last
published counters in the sum (gateway.stats_board), so that no summed
counter ever goes down: Prometheus would read a drop as a reset and the
whole new value as an increase.
"""

from __future__ import annotations

import asyncio
import time
from typing import Mapping

import grpc

from inference.metrics import INFERENCE_FAMILIES, MODEL_INFO, model_info_sample
from protos.metrics import Family, Histogram, sample_key

# process_samples and host_samples read a gateway.server.GatewayServer, which
# imports this module (through gateway.servicer): named, not imported, here.

__all__ = ["GATEWAY_FAMILIES", "CallMetrics", "code_of", "ended_code", "is_monotonic", "process_samples",
           "host_samples"]

_RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
_TIER = ("tier",)

GATEWAY_FAMILIES = (
    Family("grpc_server_started", "counter", "RPCs started on the server", _RPC_LABELS),
    Family("grpc_server_handled", "counter", "RPCs completed on the server, by status code",
           (*_RPC_LABELS, "grpc_code")),
    Family("grpc_server_handling_seconds", "histogram",
           "time from the start of an RPC to its end (a stream: its whole life)", _RPC_LABELS),
    Family("tiergate_answers", "counter", "texts answered, by the tier the answer came from (model: scored now)",
           _TIER),
    Family("tiergate_cache_lookups", "counter", "keys looked up in a tier", _TIER),
    Family("tiergate_cache_hits", "counter", "lookups that found a value that passed its check", _TIER),
    Family("tiergate_cache_misses", "counter", "lookups that found nothing usable", _TIER),
    Family("tiergate_cache_errors", "counter", "tier operations that failed (reads and writes)", _TIER),
    Family("tiergate_cache_bad_values", "counter",
           "values read back that failed their check (wrong model, damaged, forged): treated as misses and deleted",
           _TIER),
    Family("tiergate_cache_expired", "counter", "values read back past their lifetime", _TIER),
    Family("tiergate_cache_writes", "counter", "values written", _TIER),
    Family("tiergate_cache_writes_dropped", "counter", "writes dropped because the tier's queue was full", _TIER),
    Family("tiergate_l2_used_bytes", "gauge", "bytes of L2's pages in use (one LMDB per host)"),
    Family("tiergate_l2_budget_bytes", "gauge", "L2's size budget (--l2-max-mb)"),
    Family("tiergate_l2_evictions", "counter", "L2 entries evicted to stay under the budget"),
    Family("tiergate_l3_breaker_state", "gauge",
           "gateway processes whose L3 circuit breaker is in this state (closed, open, half_open)", ("state",)),
    Family("tiergate_filter_skips", "counter", "L2 lookups skipped because the Bloom filter said no"),
    Family("tiergate_singleflight_joins", "counter",
           "texts that joined a lookup already in progress for the same text instead of starting one"),
    Family("tiergate_pending_misses", "gauge", "texts waiting for Redis or the model"),
    Family("tiergate_refusals", "counter",
           "texts or calls answered with an error, by code; pending_misses_full: refused at --max-pending-misses",
           ("reason",)),
    Family("tiergate_upstream_events", "counter",
           "events of the inference client (resent: texts sent again after a lost stream)", ("event",)),
    MODEL_INFO,
    *INFERENCE_FAMILIES,
)

_TIER_NAMES = {1: "l1", 2: "l2", 3: "l3", 4: "model"}


class CallMetrics:
    """started / handled by code / seconds of one RPC method."""

    __slots__ = ("labels", "started", "handled", "seconds")

    def __init__(self, grpc_type: str, service: str, method: str) -> None:
        self.labels = {"grpc_type": grpc_type, "grpc_service": service, "grpc_method": method}
        self.started = 0
        self.handled: dict[str, int] = {}
        self.seconds = Histogram()

    def done(self, started_at: float, code: str = "OK") -> None:
        self.handled[code] = self.handled.get(code, 0) + 1
        self.seconds.observe(time.perf_counter() - started_at)

    def samples(self) -> dict[str, float]:
        out = {sample_key("grpc_server_started_total", **self.labels): float(self.started)}
        for code, n in self.handled.items():
            out[sample_key("grpc_server_handled_total", **self.labels, grpc_code=code)] = float(n)
        out.update(self.seconds.samples("grpc_server_handling_seconds", **self.labels))
        return out


def is_monotonic(key: str) -> bool:
    """Whether a sample key is of a counter or a histogram (never goes down), not of a gauge."""
    return key.split("|", 1)[0].endswith(("_total", "_bucket", "_sum", "_count"))


def code_of(exc: BaseException, context) -> str:
    """The status code an RPC ended with, for an exception that ended it."""
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # the client left, or its deadline passed
        return "DEADLINE_EXCEEDED" if _past_deadline(context) else "CANCELLED"
    return "UNKNOWN"


def ended_code(context) -> str:
    """The code of a stream whose handler returned: gRPC ends a stream whose deadline
    passed, or that the client cancelled, by ending its requests, as a half-close
    would; a passed deadline can be told, a cancel cannot (it counts as OK)."""
    return "DEADLINE_EXCEEDED" if _past_deadline(context) else "OK"


_DEADLINE_SLACK_S = 0.05


def _past_deadline(context) -> bool:
    # The client's deadline lapses on its own clock, which started the call
    # earlier than the server did (by the time the request took to arrive):
    # a call it gave up on at its deadline still has a few ms left here.
    remaining = context.time_remaining()
    return remaining is not None and remaining <= _DEADLINE_SLACK_S


def process_samples(server) -> dict[str, float]:  # server: gateway.server.GatewayServer
    """This worker's samples: they add up over the workers."""
    counters = server.counters()
    c = counters.get
    out: dict[str, float] = {}

    def add(name: str, value: float, **labels: str) -> None:
        out[sample_key(name, **labels)] = float(value)

    for source, n in enumerate(server.core.answers_by_source()):
        if source in _TIER_NAMES:
            add("tiergate_answers_total", n, tier=_TIER_NAMES[source])
    l1_hits = c("hits_l1", 0)
    l1_lookups = l1_hits + c("misses_l1", 0)
    add("tiergate_cache_lookups_total", l1_lookups, tier="l1")
    add("tiergate_cache_hits_total", l1_hits, tier="l1")
    add("tiergate_cache_misses_total", l1_lookups - l1_hits, tier="l1")
    cache = server.cache
    if cache.l2 is not None:
        lookups = c("l2_hits", 0) + c("l2_misses", 0)
        add("tiergate_cache_lookups_total", lookups, tier="l2")
        add("tiergate_cache_hits_total", c("hits_l2", 0), tier="l2")
        add("tiergate_cache_misses_total", lookups - c("hits_l2", 0), tier="l2")
        add("tiergate_cache_errors_total", c("l2_read_errors", 0) + c("l2_write_errors", 0), tier="l2")
        add("tiergate_cache_bad_values_total", c("bad_values_l2", 0), tier="l2")
        add("tiergate_cache_expired_total", c("expired_l2", 0) + c("l2_expired", 0), tier="l2")
        add("tiergate_cache_writes_total", c("l2_writes", 0), tier="l2")
        add("tiergate_cache_writes_dropped_total", c("l2_dropped", 0), tier="l2")
        add("tiergate_l2_evictions_total", c("l2_evicted", 0))
        add("tiergate_filter_skips_total", c("filter_skips_l2", 0))
    if cache.l3 is not None:
        lookups = c("l3_hits", 0) + c("l3_misses", 0)
        add("tiergate_cache_lookups_total", lookups, tier="l3")
        add("tiergate_cache_hits_total", c("hits_l3", 0), tier="l3")
        add("tiergate_cache_misses_total", lookups - c("hits_l3", 0), tier="l3")
        add("tiergate_cache_errors_total", c("l3_errors", 0), tier="l3")
        add("tiergate_cache_bad_values_total", c("bad_values_l3", 0), tier="l3")
        add("tiergate_cache_expired_total", c("expired_l3", 0), tier="l3")
        add("tiergate_cache_writes_total", c("writes_l3", 0), tier="l3")
        add("tiergate_cache_writes_dropped_total", c("writes_dropped", 0), tier="l3")
        state = cache.l3.breaker.state.value
        for name in ("closed", "open", "half_open"):
            add("tiergate_l3_breaker_state", 1 if name == state else 0, state=name)
    add("tiergate_singleflight_joins_total", c("singleflight_joined", 0))
    add("tiergate_pending_misses", c("pending_misses", 0))
    add("tiergate_refusals_total", c("refused_pending", 0), reason="pending_misses_full")
    for key, n in counters.items():
        if key.startswith("errors_"):
            add("tiergate_refusals_total", n, reason=key.removeprefix("errors_"))
        elif key.startswith("upstream_"):
            add("tiergate_upstream_events_total", n, event=key.removeprefix("upstream_"))
    for call in server.handlers.calls.values():
        out.update(call.samples())
    return out


async def host_samples(server, summed: Mapping[str, float]) -> dict[str, float]:
    """The workers' sum plus what there is one of per host."""
    out = dict(summed)
    if server.cache.l2 is not None:
        out[sample_key("tiergate_l2_used_bytes")] = float(server.cache.l2.used_bytes())
        out[sample_key("tiergate_l2_budget_bytes")] = float(server.cache.l2.config.max_bytes)
    model = server.core.current_model()
    if model is not None:
        out.update(model_info_sample(model.model_id, model.fingerprint, model.dtype, model.device))
    out.update(await server.own_inference_samples())
    return out
