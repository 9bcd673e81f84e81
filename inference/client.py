"""The gateway's client for one inference service.

One long-lived bidirectional stream carries all of a gateway's misses: texts
queued by concurrent callers go out together in one message, results come back
matched by id. The client reconnects by itself when the service restarts and
re-reads the model description each time, so a new model is noticed without
restarting the gateway.

Every result is tagged with the model of the stream it came back on (checked
against the fingerprint the service puts on each message), never with the
model the caller expected: a text scored by another model must not be cached
or reported as this one's. Imports nothing heavy: the gateway stays light.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from typing import Callable, Sequence

import grpc

from cache.upstream import Failed, ModelRef, Outcome, Scored
from inference.channel_options import CLIENT_OPTIONS, MESSAGE_MAX_ITEMS
from protos import inference_pb2, inference_pb2_grpc
from protos.errors import DeadlineExceeded, Lost, Unavailable, error_for_code
from protos.security import ClientSecurity

__all__ = ["InferenceClient", "wire_timeout_ms", "HOLD_S", "HOLD_DEPTH"]

log = logging.getLogger(__name__)

_MESSAGE_TEXT_BYTES = 2 * 1024 * 1024  # split outgoing messages well below the size limit
# While the service reports a backlog, a text sent at once would only wait in
# its queue: the stream holds new texts this long, so that one message carries
# what arrives meanwhile. Each message costs both processes a few thread
# wake-ups; at 32 misses in flight on 2 cores, one message a text was the
# rule. HOLD_DEPTH texts queued (every gateway's) is two passes of 4 ahead of
# a new text, several times the hold.
HOLD_S = 0.004
HOLD_DEPTH = 8
_U32_MAX = 2**32 - 1


def wire_timeout_ms(deadline: float | None, now: float) -> int:
    """ScoreItem.timeout_ms for a monotonic deadline: 0 for none, at least 1.

    The field is a uint32 of milliseconds (about 49.7 days). A client may send
    any deadline; one beyond what the field holds is "no deadline" to the
    service, which is what it means in practice (the gateway still enforces
    the caller's own deadline)."""
    if deadline is None:
        return 0
    ms = math.ceil((deadline - now) * 1000)
    if ms > _U32_MAX:
        return 0
    return max(1, ms)


class InferenceClient:
    def __init__(self, target: str, *, describe_timeout_s: float = 2.0,
                 on_change: Callable[[], None] | None = None, security: ClientSecurity = ClientSecurity()) -> None:
        self.target = target
        self._on_change = on_change  # called after connecting, disconnecting or a model change
        self._describe_timeout_s = describe_timeout_s
        self._channel = security.aio_channel(target, options=CLIENT_OPTIONS)
        self._metadata = security.metadata  # sent on every call: the service may require a token
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Outcome]] = {}
        self._outgoing: list[inference_pb2.ScoreItem] = []
        self._cancels: list[int] = []
        self._send_wakeup = asyncio.Event()
        self._connected = asyncio.Event()
        self._stream = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self._remote_depth = 0
        self.model: ModelRef | None = None  # of the stream now open (or the last one)

    @property
    def connected(self) -> bool:
        return self._stream is not None

    @property
    def in_flight(self) -> int:
        """Texts this client sent and has not had answered yet."""
        return len(self._pending)

    @property
    def load(self) -> int:
        """How busy the service is, as far as this client can tell: its own
        unanswered texts, or the queue depth the service last reported (which
        counts every gateway's texts), whichever is larger."""
        return max(len(self._pending), self._remote_depth)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._maintain(), name=f"inference-{self.target}")

    async def wait_connected(self, timeout: float) -> ModelRef:
        await asyncio.wait_for(self._connected.wait(), timeout)
        return self.model

    async def stats(self, timeout: float = 2.0) -> dict[str, int]:
        reply = await self._stub.GetStats(inference_pb2.InferenceStatsRequest(), timeout=timeout,
                                          metadata=self._metadata)
        return dict(reply.counters)

    async def metric_samples(self, timeout: float = 2.0) -> dict[str, float]:
        """The service's Prometheus samples (inference.metrics), without the model's info."""
        reply = await self._stub.GetStats(inference_pb2.InferenceStatsRequest(), timeout=timeout,
                                          metadata=self._metadata)
        return dict(reply.metrics)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._channel.close()

    async def score(self, texts: Sequence[str], deadline: float | None) -> list[Outcome]:
        """One Outcome per text. Never raises for a per-text problem: a text the
        service refused, or one lost with the stream, is a Failed outcome.
        Cancelling the caller withdraws its texts (the service skips them)."""
        if self._stream is None:
            error = Unavailable(f"the inference service at {self.target} is not reachable; retry with backoff")
            return [Failed(error)] * len(texts)
        loop = asyncio.get_running_loop()
        timeout_ms = wire_timeout_ms(deadline, time.monotonic())
        ids, futures = [], []
        for text in texts:
            item = inference_pb2.ScoreItem(id=next(self._ids), text=text, timeout_ms=timeout_ms)
            future = loop.create_future()
            self._pending[item.id] = future
            self._outgoing.append(item)
            ids.append(item.id)
            futures.append(future)
        self._send_wakeup.set()
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            _done, not_done = await asyncio.wait(futures, timeout=wait)
        except asyncio.CancelledError:
            self._withdraw(ids)  # nobody waits any more: let the service skip them
            raise
        late = Failed(DeadlineExceeded("deadline exceeded before the model could score the text"))
        outcomes = [f.result() if f.done() else late for f in futures]
        if not_done:
            self._withdraw(ids)  # after reading the outcomes: withdrawing cancels what is left
        return outcomes

    def _withdraw(self, ids: list[int]) -> None:
        for item_id in ids:
            future = self._pending.pop(item_id, None)
            if future is not None:
                future.cancel()
                self._cancels.append(item_id)
        self._send_wakeup.set()

    async def _maintain(self) -> None:
        backoff = 0.05
        refused = False  # the last attempt was refused for its token (logged once)
        while not self._closed:
            sender = None
            try:
                info = await self._stub.Describe(inference_pb2.DescribeRequest(), timeout=self._describe_timeout_s,
                                                 metadata=self._metadata)
                model = ModelRef(info.model_id, tuple(info.labels), info.fingerprint, info.device, info.dtype)
                if self.model is not None and self.model.fingerprint != model.fingerprint:
                    log.warning("inference model changed: %s -> %s", self.model.display, model.display)
                self.model = model
                stream = self._stub.Score(metadata=self._metadata)
                sender = asyncio.create_task(self._send(stream))
                self._stream = stream
                self._connected.set()
                self._changed()
                log.info("connected to inference service %s (%s)", self.target, model.display)
                backoff = 0.05
                refused = False
                async for response in stream:
                    self._deliver(response, model)
                log.warning("inference service %s closed the stream", self.target)
            except grpc.aio.AioRpcError as exc:
                if self._stream is not None:
                    log.warning("inference stream to %s broke: %s", self.target, exc.code().name)
                elif exc.code() == grpc.StatusCode.UNAUTHENTICATED and not refused:
                    # Retrying cannot help until the token changes: say so once, not every backoff.
                    log.error("the inference service at %s refused this gateway's token (%s); check "
                              "--inference-token-file / $TIERGATE_INFERENCE_TOKEN", self.target, exc.details())
                refused = exc.code() == grpc.StatusCode.UNAUTHENTICATED
            finally:
                was_connected = self._stream is not None
                self._stream = None
                self._remote_depth = 0
                self._connected.clear()
                if sender is not None:
                    sender.cancel()
                self._fail_pending()
                if was_connected:
                    self._changed()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def _deliver(self, response: inference_pb2.ScoreResponse, model: ModelRef) -> None:
        self._remote_depth = response.queue_depth
        if response.fingerprint != model.fingerprint:
            # Not the model this stream was opened for: its answers must not
            # pass as this model's. Fail them; the texts' callers may retry.
            log.error("inference service %s scored with %s, expected %s; dropping %d results",
                      self.target, response.fingerprint, model.fingerprint, len(response.results))
            wrong = Failed(Unavailable("the inference service changed its model mid-stream; retry"))
            outcomes = {r.id: wrong for r in response.results}
        else:
            outcomes = {
                r.id: Scored(r.label, r.score, model) if r.code == 0 else Failed(error_for_code(r.code, r.message))
                for r in response.results
            }
        for item_id, outcome in outcomes.items():
            future = self._pending.pop(item_id, None)
            if future is not None and not future.done():
                future.set_result(outcome)

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        self._outgoing.clear()
        self._cancels.clear()
        lost = Failed(Lost(f"lost the inference service at {self.target} while it held the text; retry"))
        for future in pending.values():
            if not future.done():
                future.set_result(lost)

    async def _send(self, stream) -> None:
        try:
            while True:
                await self._send_wakeup.wait()
                if self._remote_depth >= HOLD_DEPTH:
                    await asyncio.sleep(HOLD_S)
                self._send_wakeup.clear()
                while self._outgoing or self._cancels:
                    end, size = 0, 0
                    while end < len(self._outgoing) and size < _MESSAGE_TEXT_BYTES and end < MESSAGE_MAX_ITEMS:
                        size += len(self._outgoing[end].text)
                        end += 1
                    items = self._outgoing[:end]
                    del self._outgoing[:end]
                    cancels = self._cancels[:MESSAGE_MAX_ITEMS]
                    del self._cancels[:MESSAGE_MAX_ITEMS]
                    await stream.write(inference_pb2.ScoreRequest(items=items, cancel_ids=cancels))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            log.debug("inference stream write failed: %s", exc)
