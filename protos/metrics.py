"""Prometheus metrics: counted in plain Python, exposed with prometheus-client.

Every process counts in plain ints and floats (the counters its layers keep
anyway, and the Histogram below); the numbers become Prometheus metric
families only when /metrics is scraped. prometheus-client's own metric
objects could do the counting, but across the gateway's worker processes they
need its multiprocess mode, where every increment takes a lock and writes an
mmap'd file: several of those per call on a hit path of tens of microseconds.
Instead each worker publishes a snapshot of its samples (gateway.stats_board,
4x a second) and the process serving /metrics adds them up.

A sample is a flat key, `name` or `name|label=value|...`, and a number, so
the snapshots of many processes add up key by key. Label values are names
this code chooses (methods, status codes, tiers, reasons, the model's id),
never request text.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Mapping

__all__ = ["Family", "Histogram", "MetricsEndpoint", "SnapshotCollector", "sample_key",
           "LATENCY_BOUNDS_S", "on_loop", "serve_metrics"]

log = logging.getLogger(__name__)

# From 100 us (an L1 hit) to 10 s (a miss behind a long queue).
LATENCY_BOUNDS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)


def sample_key(name: str, **labels: str) -> str:
    if not labels:
        return name
    return "|".join([name, *(f"{k}={v}" for k, v in labels.items())])


def _split(key: str) -> tuple[str, dict[str, str]]:
    name, *pairs = key.split("|")
    return name, dict(pair.split("=", 1) for pair in pairs)


class Histogram:
    """Counts per bucket (not cumulative, so that snapshots add up) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def samples(self, name: str, **labels: str) -> dict[str, float]:
        out = {sample_key(f"{name}_bucket", **labels, le=_le(bound)): float(n)
               for bound, n in zip((*self.bounds, float("inf")), self.counts)}
        out[sample_key(f"{name}_sum", **labels)] = self.sum
        out[sample_key(f"{name}_count", **labels)] = float(sum(self.counts))
        return out


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


@dataclass(frozen=True)
class Family:
    name: str            # counters without _total: prometheus-client adds it
    kind: str            # counter, gauge or histogram
    help: str
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("counter", "gauge", "histogram"):
            raise ValueError(f"metric kind must be counter, gauge or histogram, got {self.kind!r}")


class SnapshotCollector:
    """A prometheus-client collector over `source()`: flat samples, already summed."""

    def __init__(self, families: Iterable[Family], source: Callable[[], Mapping[str, float]]) -> None:
        self.families = {f.name: f for f in families}
        self.source = source

    def describe(self):
        return []  # no metric objects to register up front; collect() says it all

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        plain: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        hist: dict[str, dict[tuple, dict]] = defaultdict(dict)
        for key, value in self.source().items():
            name, labels = _split(key)
            for suffix in ("_bucket", "_sum", "_count"):
                base = name[: -len(suffix)]
                if name.endswith(suffix) and self.families.get(base, Family(base, "gauge", "")).kind == "histogram":
                    le = labels.pop("le", None)
                    series = hist[base].setdefault(tuple(sorted(labels.items())), {"buckets": {}, "sum": 0.0})
                    if suffix == "_bucket":
                        series["buckets"][le] = value
                    elif suffix == "_sum":
                        series["sum"] = value
                    break
            else:
                plain[name.removesuffix("_total")].append((labels, value))
        for family in self.families.values():
            labels = list(family.labels)
            if family.kind == "histogram":
                metric = HistogramMetricFamily(family.name, family.help, labels=labels)
                for series_labels, series in hist.get(family.name, {}).items():
                    values = dict(series_labels)
                    metric.add_metric([values.get(k, "") for k in labels], _cumulative(series["buckets"]),
                                      series["sum"])
            else:
                cls = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
                metric = cls(family.name, family.help, labels=labels)
                for values, value in plain.get(family.name, ()):
                    metric.add_metric([values.get(k, "") for k in labels], value)
            yield metric


def _cumulative(buckets: dict[str, float]) -> list[tuple[str, float]]:
    ordered = sorted(buckets.items(), key=lambda kv: float(kv[0]))  # "+Inf" sorts last
    out, total = [], 0.0
    for le, n in ordered:
        total += n
        out.append((le, total))
    return out


class MetricsEndpoint:
    """prometheus-client's HTTP server in a thread of its own: /metrics."""

    def __init__(self, httpd, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.port: int = httpd.server_address[1]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def on_loop(samples: Callable[[], Awaitable[Mapping[str, float]]],
            timeout_s: float = 5.0) -> Callable[[], Mapping[str, float]]:
    """A source for SnapshotCollector that reads the numbers on the running
    event loop, where they are counted (the HTTP server scrapes from its own
    thread, and a dict that changes size while it is copied raises)."""
    loop = asyncio.get_running_loop()
    return lambda: asyncio.run_coroutine_threadsafe(samples(), loop).result(timeout_s)


def serve_metrics(host: str, port: int, collector: SnapshotCollector) -> MetricsEndpoint:
    """Serves /metrics on host:port (0: any free port). OSError names the port when it is taken."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); "
                      "--metrics-port picks another port, 0 turns metrics off") from None
    return MetricsEndpoint(httpd, thread)
