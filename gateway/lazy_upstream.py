"""An Upstream that starts its inference service at the first miss.

`tiergate classify` without --target runs its own stack. Loading the model
takes seconds, and a rerun over rows that are already in L2 never needs it:
with the model's record (inference.model_record) the gateway knows the
fingerprint, so it can answer from L1/L2 at once, and only the first text that
no tier holds starts the service. Callers that miss while it starts wait for it
within their own deadline; a start that fails is tried again by the next miss.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Callable, Protocol, Sequence

from cache.upstream import Failed, ModelRef, Outcome
from inference.replicas import ReplicaSet
from protos.errors import DeadlineExceeded, Unavailable

__all__ = ["LazyUpstream", "Service"]

log = logging.getLogger(__name__)


class Service(Protocol):
    """What LazyUpstream starts: gateway.stack.InferenceProcess."""

    async def start(self) -> str: ...  # its address, once it serves

    async def stop(self) -> None: ...


class LazyUpstream:
    """The Upstream (cache.upstream) of a stack whose model loads on demand."""

    def __init__(self, service: Service, model: ModelRef | None, *, connect_timeout_s: float = 60.0,
                 on_model: Callable[[ModelRef], None] | None = None) -> None:
        self.model = model    # until the service is up: the recorded model
        self.generation = 0   # +1 whenever the served model differs from what `model` said
        self.counters: Counter[str] = Counter()
        self._service = service
        self._connect_timeout_s = connect_timeout_s
        self._on_model = on_model
        self._replicas: ReplicaSet | None = None
        self._starting: asyncio.Task | None = None
        self._closed = False

    @property
    def started(self) -> bool:
        """Whether the inference service was started (by a miss, or by start_now)."""
        return self._starting is not None or self._replicas is not None

    def start(self) -> None:
        """GatewayServer's start hook: nothing starts before the first miss."""

    async def start_now(self, timeout_s: float) -> ModelRef:
        """Start the service and wait for its model (when there is no record to go by)."""
        replicas = await asyncio.wait_for(asyncio.shield(self._ensure_starting()), timeout_s)
        return replicas.model

    def _follow(self, model: ModelRef) -> None:
        if model != self.model:
            if self.model is not None:
                log.warning("the model loaded is %s, not %s as recorded; answering with it from now on",
                            model.display, self.model.display)
            self.model = model
            self.generation += 1
        if self._on_model is not None:
            self._on_model(model)

    def _ensure_starting(self) -> asyncio.Task:
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        return self._starting

    async def _start(self) -> ReplicaSet:
        try:
            address = await self._service.start()
            replicas = ReplicaSet([address], on_model_change=self._follow)
            replicas.start()
            try:
                await replicas.wait_connected(self._connect_timeout_s)
            except TimeoutError:
                await replicas.close()
                raise RuntimeError(f"the inference service at {address} did not answer within "
                                   f"{self._connect_timeout_s:.0f} s") from None
        except BaseException:
            self._starting = None  # the next miss tries again
            raise
        self.counters["service_starts"] += 1
        self._replicas = replicas
        return replicas

    async def score(self, texts: Sequence[str], deadline: float | None) -> list[Outcome]:
        replicas = self._replicas
        if replicas is None:
            if self._closed:
                return [Failed(Unavailable("the embedded stack is shutting down"))] * len(texts)
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                replicas = await asyncio.wait_for(asyncio.shield(self._ensure_starting()), wait)
            except asyncio.TimeoutError:
                return [Failed(DeadlineExceeded("deadline exceeded while the model was loading"))] * len(texts)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("starting the inference service failed: %s", exc)
                return [Failed(Unavailable(f"the inference service did not start ({exc}); retry with backoff"))] \
                    * len(texts)
        return await replicas.score(texts, deadline)

    async def close(self) -> None:
        self._closed = True
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        if self._replicas is not None:
            await self._replicas.close()
        await self._service.stop()
