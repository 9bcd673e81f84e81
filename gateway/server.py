"""Assembles and runs one gateway process: cache tiers, inference client, gRPC server."""

from __future__ import annotations

import asyncio
import gc
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from cache import CacheOptions, KeyFilter, LmdbConfig, LmdbTier, MemoryTier, RedisConfig, RedisTier, TieredCache
from cache.l2_lmdb import filter_capacity_for
from gateway.classifier import Classifier, Limits
from gateway.connections import ConnectionOptions
from gateway.gate import ClosingGate
from gateway.metrics import GATEWAY_FAMILIES, host_samples, is_monotonic, process_samples
from gateway.servicer import ADMIN_SERVICE, CLASSIFIER_SERVICE, ClassifierHandlers, render_l1
from protos.health import HEALTH_SERVICE, HealthService
from protos.metrics import MetricsEndpoint, SnapshotCollector, on_loop, serve_metrics
from protos.reflection import enable_reflection
from protos.security import ClientSecurity, ServerTls, TlsFiles, TokenAuth
from gateway.stats_board import PUBLISH_INTERVAL_S, StatsBoard
from cache.upstream import Upstream
from inference.replicas import ReplicaSet

__all__ = ["GatewayConfig", "GatewayServer"]

log = logging.getLogger(__name__)

_GATE_ONLY_S = 0.5  # see stop()
_CHILD_STATS_TIMEOUT_S = 2.0  # a scrape waits this long for the inference child's numbers


@dataclass(frozen=True)
class GatewayConfig:
    inference_targets: tuple[str, ...] = ("127.0.0.1:50052",)  # misses go to the least loaded
    host: str = "127.0.0.1"
    port: int = 50051                       # 0: any free port
    l1_max_entries: int = 100_000
    filter_capacity: int | None = None      # keys per Bloom filter generation; None: sized from the L2 budget
    l2_filter: bool = True                  # False: no Bloom filter, every L1 miss reads L2 (a batch job:
                                            # warming the filter from a large L2 costs seconds it never earns back)
    lmdb: LmdbConfig | None = None          # None: no L2
    redis: RedisConfig | None = None        # None: no L3
    limits: Limits = field(default_factory=Limits)
    max_concurrent_rpcs: int | None = None  # beyond it: RESOURCE_EXHAUSTED at once
    connections: ConnectionOptions = field(default_factory=ConnectionOptions)
    connect_timeout_s: float = 60.0         # how long start() waits for the inference service
    stats_dir: str | None = None            # shared by the workers of one gateway (gateway.stats_board)
    metrics_port: int | None = None         # Prometheus /metrics on host:metrics_port (0: any free); None: off
    count_calls: bool = False               # count and time every call for metrics another worker serves
    cache_secret: bytes | None = field(default=None, repr=False)  # authenticates L2/L3 values; never logged
    tls: TlsFiles | None = None             # the public port's certificate (and client CA: mTLS); None: plaintext
    auth_tokens: str | None = None          # file of bearer tokens every call but health/reflection needs; None: open
    inference_security: ClientSecurity = ClientSecurity()  # TLS and token towards the inference service(s)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"gateway port must be in 0..65535, got {self.port}")
        if self.l1_max_entries < 1:
            raise ValueError(f"l1_max_entries must be >= 1, got {self.l1_max_entries}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be in 0..65535, got {self.metrics_port}")
        if self.filter_capacity is not None and self.filter_capacity < 1000:
            raise ValueError(f"filter_capacity must be >= 1000, got {self.filter_capacity}")
        # No targets: the GatewayServer is handed its Upstream instead.
        for target in self.inference_targets:
            if target.startswith("unix:") and len(target) > len("unix:"):
                continue  # a Unix socket (serve's own inference child)
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"inference address must be host:port, got {target!r}")

    def message_limit(self) -> int:
        # A full batch of maximal texts plus protobuf framing must fit in one message.
        return self.limits.max_batch * (self.limits.max_text_bytes + 8) + 64 * 1024


class GatewayServer:
    def __init__(self, config: GatewayConfig, upstream: Upstream | None = None) -> None:
        """`upstream` scores the misses; None: a ReplicaSet of config.inference_targets."""
        if upstream is None and not config.inference_targets:
            raise ValueError("at least one inference service address (host:port) is required")
        self.config = config
        self._given_upstream = upstream
        self.port: int | None = None
        self.cache: TieredCache | None = None
        self.inference: ReplicaSet | Upstream | None = None
        self.handlers: ClassifierHandlers | None = None
        self._server: grpc.aio.Server | None = None
        self._health: HealthService | None = None
        self._gate = ClosingGate()  # first handler: closes when the drain ends
        # The files are read here: a bad one is an error before anything starts.
        self._tls = ServerTls(config.tls) if config.tls is not None else None
        self._auth = TokenAuth(config.auth_tokens) if config.auth_tokens else None  # None: no handler, no cost
        self._stopped = False
        self.core: Classifier | None = None
        self._board = StatsBoard(config.stats_dir)
        self._publisher: asyncio.Task | None = None
        self.metrics: MetricsEndpoint | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def reloadable(self) -> bool:
        """Whether there is anything for reload() (SIGHUP) to read again."""
        return self._tls is not None or self._auth is not None

    def reload(self) -> None:
        """Reads the TLS files and the tokens file again (SIGHUP). A file that
        does not load is logged and the old certificate or tokens stay."""
        if self._tls is not None:
            self._tls.reload()
        if self._auth is not None:
            self._auth.reload()

    async def start(self, *, wait_for_inference: bool = True) -> None:
        cfg = self.config
        l2 = LmdbTier(cfg.lmdb) if cfg.lmdb is not None else None
        l3 = RedisTier(cfg.redis) if cfg.redis is not None else None
        key_filter = None
        if l2 is not None and cfg.l2_filter:
            key_filter = KeyFilter(cfg.filter_capacity or filter_capacity_for(cfg.lmdb))
        self.inference = self._given_upstream or ReplicaSet(list(cfg.inference_targets),
                                                            security=cfg.inference_security)
        options = CacheOptions(max_pending=cfg.limits.max_pending_misses, secret=cfg.cache_secret)
        self.cache = TieredCache(MemoryTier(cfg.l1_max_entries, render_l1), self.inference, l2, l3, key_filter,
                                 options)
        if key_filter is not None:
            warmed = self.cache.warm_filter()
            log.info("L2 filter warmed with %d keys", warmed)
        self.inference.start()
        self.core = Classifier(self.cache, self.inference, cfg.limits)
        self.handlers = ClassifierHandlers(self.core, self.stats,
                                           call_metrics=cfg.count_calls or cfg.metrics_port is not None)

        limit = cfg.message_limit()
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 1),
                *cfg.connections.server_options(),
            ],
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        if cfg.metrics_port is not None:
            # Before the gRPC port: a taken metrics port fails the start, never a server that said SERVING.
            self.metrics = serve_metrics(cfg.host, cfg.metrics_port,
                                         SnapshotCollector(GATEWAY_FAMILIES, on_loop(self.metric_samples)))
        self._health = HealthService()
        server.add_generic_rpc_handlers(
            [self._gate, *([self._auth] if self._auth else []), *self.handlers.generic_handlers(),
             self._health.generic_handler()])
        enable_reflection([CLASSIFIER_SERVICE, ADMIN_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
        address = f"{cfg.host}:{cfg.port}"
        self.port = (server.add_secure_port(address, self._tls.credentials()) if self._tls is not None
                     else server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot listen on {cfg.host}:{cfg.port} (in use?)")
        await server.start()
        self._server = server
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if wait_for_inference:
            try:
                await self.inference.wait_connected(cfg.connect_timeout_s)
            except TimeoutError:
                raise RuntimeError(
                    f"no inference service at {','.join(cfg.inference_targets)} answered within "
                    f"{cfg.connect_timeout_s:.0f} s"
                ) from None
        # SERVING from here on: with the inference service gone later, cached texts are still served.
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if cfg.stats_dir:
            self._publisher = asyncio.get_running_loop().create_task(self._publish_counters())
        # What exists now (modules, stubs, config) lives as long as the process:
        # keep it out of the collector's full passes, which otherwise stalled
        # every call for ~60 ms every few seconds under load.
        gc.collect()
        gc.freeze()

    async def _set_health(self, status) -> None:
        for name in ("", CLASSIFIER_SERVICE):
            await self._health.set(name, status)

    def counters(self) -> dict[str, int]:
        """This process's counters."""
        counters: dict[str, int] = {}
        counters.update(self.cache.counters)
        counters.update(self.handlers.counters)
        counters.update({f"upstream_{k}": v for k, v in self.inference.counters.items()})
        counters["hits_l1"] = counters.get("hits_l1", 0) + self.core.fast_hits  # L1 hits answered from raw bytes
        counters["pending_misses"] = self.cache.pending
        if self._auth is not None:
            counters["errors_unauthenticated"] = self._auth.refused
        for tier in (self.cache.l2, self.cache.l3):
            if tier is not None:
                counters.update({f"{tier.name}_{k}": v for k, v in tier.counters.items()})
        return counters

    def stats(self) -> tuple[dict[str, int], int]:
        """(counters summed over every worker of this gateway, number of workers)."""
        return self._board.total("counters", self.counters())

    async def _publish_counters(self) -> None:
        while True:
            sections = {"counters": self.counters()}
            if self.handlers.calls:
                sections["metrics"] = process_samples(self)
            self._board.publish(sections)
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    async def metric_samples(self) -> dict[str, float]:
        """Prometheus samples of this host's gateway: every worker's, summed, and the host's own."""
        summed, _workers = self._board.total("metrics", process_samples(self), monotonic=is_monotonic)
        return await host_samples(self, summed)

    async def own_inference_samples(self) -> dict[str, float]:
        """The samples of the inference service this gateway started (serve's child, on a Unix
        socket); a standalone inference service serves its own (tiergate inference --metrics-port)."""
        clients = [c for c in getattr(self.inference, "clients", ()) if c.target.startswith("unix:")]
        out: dict[str, float] = {}
        for client in clients:
            try:
                out.update(await client.metric_samples(timeout=_CHILD_STATS_TIMEOUT_S))
            except grpc.aio.AioRpcError:
                pass  # the child is restarting or gone: its numbers are missing from this scrape
        return out

    async def drain(self) -> None:
        """Health NOT_SERVING for every name at once (and for good); calls are still served."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()

    async def stop(self, grace_s: float = 2.0) -> None:
        """New calls UNAVAILABLE (port closed; a call that still gets in is told the
        gateway is shutting down), calls in flight get grace_s, then L2/L3 close.
        Once: a later call (e.g. from a `finally` after the drain) returns at once."""
        if self._stopped:
            return
        self._stopped = True
        if self._publisher is not None:
            self._publisher.cancel()
            self._board.withdraw()
        if self.metrics is not None:
            # Not on the loop: a scrape in progress waits for the loop to answer it.
            await asyncio.get_running_loop().run_in_executor(None, self.metrics.close)
        if self._server is not None:
            self._gate.close()
            await self.drain()
            if grace_s > 0:
                # A moment when every new call gets the gate's UNAVAILABLE "shutting
                # down" (which clients retry elsewhere): a call that reaches the
                # port once gRPC's own stop has begun may be failed CANCELLED.
                await asyncio.sleep(min(_GATE_ONLY_S, grace_s))
            await self._server.stop(grace_s)
        if self.inference is not None:
            await self.inference.close()
        if self.cache is not None:
            await self.cache.close()
