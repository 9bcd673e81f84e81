"""Assembles and runs one gateway process: cache tiers, inference client, gRPC server."""

from __future__ import annotations

import asyncio
import gc
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from cache import KeyFilter, LmdbConfig, LmdbTier, MemoryTier, RedisConfig, RedisTier, TieredCache
from gateway.classifier import Classifier, Limits
from gateway.memo import ResponseMemo
from gateway.servicer import ADMIN_SERVICE, CLASSIFIER_SERVICE, ClassifierHandlers
from gateway.stats_board import PUBLISH_INTERVAL_S, StatsBoard
from inference.replicas import ReplicaSet

__all__ = ["GatewayConfig", "GatewayServer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewayConfig:
    inference_targets: tuple[str, ...] = ("127.0.0.1:50052",)  # misses go to the least loaded
    host: str = "127.0.0.1"
    port: int = 50051                       # 0: any free port
    l1_max_entries: int = 100_000
    filter_capacity: int = 1_000_000        # keys per Bloom filter generation
    lmdb: LmdbConfig | None = None          # None: no L2
    redis: RedisConfig | None = None        # None: no L3
    limits: Limits = field(default_factory=Limits)
    max_concurrent_rpcs: int | None = None  # beyond it: RESOURCE_EXHAUSTED at once
    connect_timeout_s: float = 60.0         # how long start() waits for the inference service
    stats_dir: str | None = None            # shared by the workers of one gateway (gateway.stats_board)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"gateway port must be in 0..65535, got {self.port}")
        if self.l1_max_entries < 1:
            raise ValueError(f"l1_max_entries must be >= 1, got {self.l1_max_entries}")
        if self.filter_capacity < 1000:
            raise ValueError(f"filter_capacity must be >= 1000, got {self.filter_capacity}")
        if not self.inference_targets:
            raise ValueError("at least one inference service address (host:port) is required")
        for target in self.inference_targets:
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"inference address must be host:port, got {target!r}")

    def message_limit(self) -> int:
        # A full batch of maximal texts plus protobuf framing must fit in one message.
        return self.limits.max_batch * (self.limits.max_text_bytes + 8) + 64 * 1024


class GatewayServer:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.port: int | None = None
        self.cache: TieredCache | None = None
        self.inference: ReplicaSet | None = None
        self.handlers: ClassifierHandlers | None = None
        self._server: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None
        self._board = StatsBoard(config.stats_dir)
        self._publisher: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self, *, wait_for_inference: bool = True) -> None:
        cfg = self.config
        l2 = LmdbTier(cfg.lmdb) if cfg.lmdb is not None else None
        l3 = RedisTier(cfg.redis) if cfg.redis is not None else None
        key_filter = KeyFilter(cfg.filter_capacity) if l2 is not None else None
        self.cache = TieredCache(MemoryTier(cfg.l1_max_entries), l2, l3, key_filter)
        if key_filter is not None:
            warmed = self.cache.warm_filter()
            log.info("L2 filter warmed with %d keys", warmed)
        self.inference = ReplicaSet(list(cfg.inference_targets))
        self.inference.start()
        core = Classifier(self.cache, self.inference, cfg.limits)
        self.handlers = ClassifierHandlers(core, ResponseMemo(cfg.l1_max_entries), self.stats)

        limit = cfg.message_limit()
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 1),
            ],
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        server.add_generic_rpc_handlers(self.handlers.generic_handlers())
        self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [CLASSIFIER_SERVICE, ADMIN_SERVICE, "grpc.health.v1.Health", reflection.SERVICE_NAME], server
        )
        self.port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
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
        memo_hits = self.handlers.memo.hits
        counters["memo_hits"] = memo_hits
        counters["hits_l1"] = counters.get("hits_l1", 0) + memo_hits  # the memo is part of L1
        for tier in (self.cache.l2, self.cache.l3):
            if tier is not None:
                counters.update({f"{tier.name}_{k}": v for k, v in tier.counters.items()})
        return counters

    def stats(self) -> tuple[dict[str, int], int]:
        """(counters summed over every worker of this gateway, number of workers)."""
        return self._board.total(self.counters())

    async def _publish_counters(self) -> None:
        while True:
            self._board.publish(self.counters())
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    async def stop(self, grace: float = 2.0) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            self._board.withdraw()
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace)
        if self.inference is not None:
            await self.inference.close()
        if self.cache is not None:
            await self.cache.close()
