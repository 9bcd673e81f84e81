"""The inference service: one process, one model, many gateways' misses.

Each gateway keeps one bidirectional Score stream open; every message carries
many (id, text) items and results go back as soon as their batch is scored,
matched by id.
"""

from __future__ import annotations

import asyncio
import os
import gc
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from inference.batcher import BatcherConfig, DynamicBatcher, QueueFull
from inference.channel_options import server_options
from inference.limits import ScoreLimits
from inference.metrics import INFERENCE_FAMILIES, MODEL_INFO, inference_samples, model_info_sample
from inference.model import ModelConfig, SequenceClassifier
from inference.runtime import load_classifier
from protos import inference_pb2, inference_pb2_grpc
from protos.health import HEALTH_SERVICE, HealthService
from protos.metrics import MetricsEndpoint, SnapshotCollector, on_loop, sample_key, serve_metrics
from protos.reflection import enable_reflection
from protos.errors import Cancelled, ModelFailed, TiergateError, status_for
from protos.security import ServerTls, TlsFiles, TokenAuth

__all__ = ["InferenceConfig", "InferenceServer", "SHUTTING_DOWN"]

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
SHUTTING_DOWN = "the inference service is shutting down; the gateway sends new texts to another replica"


@dataclass(frozen=True)
class InferenceConfig:
    model: ModelConfig
    batcher: BatcherConfig = BatcherConfig()
    host: str = "127.0.0.1"
    port: int = 50052  # 0: any free port
    # A Unix socket to listen on instead of host:port: only who may enter its
    # directory can connect (`serve` puts it in a 0700 one of its own).
    uds: str | None = None
    metrics_port: int | None = None  # Prometheus /metrics on host:metrics_port (0: any free port); None: off
    limits: ScoreLimits = ScoreLimits()  # its own, whoever calls it (not only through a gateway)
    tls: TlsFiles | None = None          # TCP only; client_ca: gateways need a certificate (mTLS)
    auth_tokens: str | None = None       # file of bearer tokens every call but health/reflection needs

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"inference port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"inference metrics port must be in 0..65535, got {self.metrics_port}")
        if self.uds is not None and not self.uds:
            raise ValueError("inference uds path is empty")
        if self.uds is not None and self.tls is not None:
            raise ValueError("TLS is for TCP: a Unix socket (--uds) is protected by its directory's permissions")


def _error_result(item_id: int, exc: BaseException) -> inference_pb2.ScoreResult:
    # The batcher's refusals (QueueFull, DeadlineExpired) are TiergateErrors already.
    if isinstance(exc, asyncio.CancelledError):
        exc = Cancelled("cancelled")
    elif not isinstance(exc, TiergateError):
        log.error("the model failed to score a text", exc_info=exc)
        exc = ModelFailed("the model failed to score this text (logged by the inference service)")
    code, message = status_for(exc)
    return inference_pb2.ScoreResult(id=item_id, code=code.value[0], message=message)


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, model: SequenceClassifier, batcher: DynamicBatcher, limits: ScoreLimits = ScoreLimits()) -> None:
        self._model = model
        self._batcher = batcher
        self._limits = limits
        info = model.info
        self._info = inference_pb2.ModelInfo(
            model_id=info.model_id, labels=list(info.labels), fingerprint=info.fingerprint,
            device=info.device, dtype=info.dtype,
        )
        self._closing = False
        self._readers: set[asyncio.Task] = set()  # of the open Score streams
        self._rejected_invalid = 0  # texts over the service's own limits
        self._messages = self._items = 0  # Score messages received and the texts they carried

    def close_intake(self) -> None:
        """Score streams stop reading new texts: each answers those it holds,
        then ends UNAVAILABLE, and the gateway's client reconnects (to another
        replica, where there is one); texts it sent meanwhile fail there as
        lost with the stream, so they may be sent again elsewhere."""
        self._closing = True
        for reader in self._readers:
            reader.cancel()

    async def Describe(self, request, context):
        return self._info

    async def GetStats(self, request, context):
        return inference_pb2.InferenceStats(counters=self.counters(), metrics=self.metric_samples())

    def counters(self) -> dict[str, int]:
        counters = dict(self._batcher.counters)
        counters["queue_depth"] = self._batcher.depth
        counters["rejected_invalid"] = self._rejected_invalid
        counters["score_messages"] = self._messages
        counters["score_items"] = self._items
        return counters

    def metric_samples(self) -> dict[str, float]:
        """This service's Prometheus samples, but the model's info (inference.metrics)."""
        return inference_samples(self.counters(), self._batcher.depth, self._batcher.metrics.samples())

    async def Score(self, request_iterator, context):
        if self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        # Results (or None, a wake-up for a cancelled item) queue here as
        # batches finish; the loop below sends everything ready in one message.
        outbox: asyncio.Queue = asyncio.Queue()
        pending: dict[int, asyncio.Future] = {}

        def deliver(item_id: int, future: asyncio.Future) -> None:
            pending.pop(item_id, None)
            if future.cancelled():
                outbox.put_nowait(None)
            elif future.exception() is not None:
                outbox.put_nowait(_error_result(item_id, future.exception()))
            else:
                label, score = future.result()
                outbox.put_nowait(inference_pb2.ScoreResult(id=item_id, label=label, score=score))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    self._messages += 1
                    self._items += len(request.items)
                    too_many = self._limits.message_error(len(request.items))
                    for item in request.items:
                        refused = too_many or self._limits.text_error(item.text)
                        if refused is not None:
                            self._rejected_invalid += 1
                            outbox.put_nowait(_error_result(item.id, refused))
                            continue
                        try:
                            future = self._batcher.submit(item.text, item.timeout_ms / 1000 or None)
                        except QueueFull as exc:
                            outbox.put_nowait(_error_result(item.id, exc))
                            continue
                        pending[item.id] = future
                        future.add_done_callback(lambda f, i=item.id: deliver(i, f))
                    for item_id in request.cancel_ids:
                        future = pending.get(item_id)
                        if future is not None:
                            future.cancel()  # the batcher skips it before it costs a forward pass
            finally:
                outbox.put_nowait(_READ_DONE)

        reader = asyncio.create_task(read())
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        reading = True
        try:
            while reading or pending:
                ready = [await outbox.get()]
                while not outbox.empty():
                    ready.append(outbox.get_nowait())
                results = []
                for item in ready:
                    if item is _READ_DONE:
                        reading = False
                    elif item is not None:
                        results.append(item)
                if results:
                    yield inference_pb2.ScoreResponse(
                        results=results, fingerprint=self._info.fingerprint, queue_depth=self._batcher.depth
                    )
            if self._closing:
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        finally:
            reader.cancel()
            for future in list(pending.values()):
                future.cancel()


_READ_DONE = object()


class _GenericOnly:
    """Collects add_InferenceServicer_to_server's handlers as generic ones only:
    gRPC looks registered method handlers up before any generic handler, so
    they would bypass the TokenAuth in front of them."""

    def __init__(self) -> None:
        self.handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.handlers.extend(handlers)

    def add_registered_method_handlers(self, service_name, method_handlers) -> None:
        pass  # the generic handler above serves the same methods


class InferenceServer:
    def __init__(self, config: InferenceConfig) -> None:
        self.config = config
        self.model = None  # loaded by start(), with the runtime inference.runtime picks
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._batcher: DynamicBatcher | None = None
        self._servicer: InferenceServicer | None = None
        self._stopped = False
        self._health: HealthService | None = None
        self.metrics: MetricsEndpoint | None = None
        # Read here, before the model loads: a bad file is an error at once.
        self._tls = ServerTls(config.tls) if config.tls is not None else None
        self._auth = TokenAuth(config.auth_tokens) if config.auth_tokens else None

    @property
    def reloadable(self) -> bool:
        """Whether there is anything for reload() (SIGHUP) to read again."""
        return self._tls is not None or self._auth is not None

    def reload(self) -> None:
        """Reads the TLS files and tokens file again (SIGHUP); what does not load is logged and kept."""
        if self._tls is not None:
            self._tls.reload()
        if self._auth is not None:
            self._auth.reload()

    async def metric_samples(self) -> dict[str, float]:
        info = self.model.info
        samples = model_info_sample(info.model_id, info.fingerprint, info.dtype, info.device)
        samples.update(self._servicer.metric_samples())
        if self._auth is not None:
            samples[sample_key("tiergate_inference_refusals_total", reason="unauthenticated")] = self._auth.refused
        return samples

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Loading takes seconds: keep the loop free (and signals handled) meanwhile.
        self.model = await loop.run_in_executor(None, load_classifier, self.config.model)
        info = self.model.info
        self._batcher = DynamicBatcher(self.model.forward, self.config.batcher.for_model(info),
                                       prepare_batch=self.model.tokenize, lanes=info.lanes,
                                       count_tokens=self.model.count_tokens,
                                       prepare_inline=self.model.encodes_when_counting)
        self._batcher.start()
        server = grpc.aio.server(options=server_options(self.config.limits.max_message_bytes()))
        self._servicer = InferenceServicer(self.model, self._batcher, self.config.limits)
        servicer = _GenericOnly()
        inference_pb2_grpc.add_InferenceServicer_to_server(self._servicer, servicer)
        health = HealthService()
        auth = [self._auth] if self._auth is not None else []
        server.add_generic_rpc_handlers([*auth, *servicer.handlers, health.generic_handler()])
        enable_reflection([SERVICE_NAME, reflection.SERVICE_NAME, HEALTH_SERVICE], server)
        if self.config.uds:
            if os.path.exists(self.config.uds):
                os.unlink(self.config.uds)  # left by a run that was killed; binding would fail
            if server.add_insecure_port(f"unix:{self.config.uds}") == 0:
                raise OSError(f"cannot listen on the Unix socket {self.config.uds}")
            self.port = 0
        elif self._tls is not None:
            self.port = server.add_secure_port(f"{self.config.host}:{self.config.port}", self._tls.credentials())
        else:
            self.port = server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.config.metrics_port is not None:
            # Before serving: a taken metrics port fails the start, never a service that said SERVING.
            collector = SnapshotCollector((MODEL_INFO, *INFERENCE_FAMILIES), on_loop(self.metric_samples))
            self.metrics = serve_metrics(self.config.host, self.config.metrics_port, collector)
        await server.start()
        for name in ("", SERVICE_NAME):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        self._health = health
        # The model, torch and transformers live as long as the process: keep
        # them out of the collector's full passes (as the gateway does).
        gc.collect()
        gc.freeze()

    @property
    def address(self) -> str:
        return f"unix:{self.config.uds}" if self.config.uds else f"{self.config.host}:{self.port}"

    async def drain(self) -> None:
        """Health NOT_SERVING for every name at once (and for good); texts are still scored."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()

    async def stop(self, grace_s: float = 2.0) -> None:
        """No new connections or Score streams; open streams answer what they
        hold (see close_intake) within grace_s; then the batcher closes. Once:
        a later call returns at once."""
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            self._servicer.close_intake()
            await self.drain()
            await self._server.stop(grace_s)
        if self._batcher is not None:
            await self._batcher.close()
        if self.metrics is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.metrics.close)
