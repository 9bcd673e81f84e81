"""The gateway's client for the inference service.

One long-lived bidirectional stream carries all of a gateway's misses: texts
queued by concurrent callers go out together in one message, results come back
matched by id. The client reconnects by itself when the service restarts and
re-reads the model description each time, so a new model is noticed without
restarting the gateway. Imports nothing heavy: the gateway process stays light.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass

import grpc

from inference.channel_options import CLIENT_OPTIONS
from protos import inference_pb2, inference_pb2_grpc

__all__ = ["InferenceClient", "InferenceUnavailable", "InferenceRejected", "RemoteModel"]

log = logging.getLogger(__name__)

_MESSAGE_TEXT_BYTES = 2 * 1024 * 1024  # split outgoing messages well below the size limit


class InferenceUnavailable(Exception):
    """No inference service can take the text now (down, restarting, unreachable)."""


class InferenceRejected(Exception):
    """The inference service answered this text with a non-OK status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


_CODES = {c.value[0]: c for c in grpc.StatusCode}


@dataclass(frozen=True)
class RemoteModel:
    model_id: str
    labels: tuple[str, ...]
    fingerprint: str
    device: str
    dtype: str

    @property
    def display(self) -> str:
        return f"{self.model_id}@{self.fingerprint}"


class InferenceClient:
    def __init__(self, target: str, *, describe_timeout_s: float = 2.0, on_change=None) -> None:
        self.target = target
        self._on_change = on_change  # called after connecting, disconnecting or a model change
        self._describe_timeout_s = describe_timeout_s
        self._channel = grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._outgoing: list[inference_pb2.ScoreItem] = []
        self._cancels: list[int] = []
        self._send_wakeup = asyncio.Event()
        self._connected = asyncio.Event()
        self._stream = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self._remote_depth = 0
        self.model: RemoteModel | None = None

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

    async def wait_connected(self, timeout: float) -> RemoteModel:
        await asyncio.wait_for(self._connected.wait(), timeout)
        return self.model

    async def stats(self, timeout: float = 2.0) -> dict[str, int]:
        reply = await self._stub.GetStats(inference_pb2.InferenceStatsRequest(), timeout=timeout)
        return dict(reply.counters)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._channel.close()

    async def score(self, texts: list[str], timeout: float | None = None) -> tuple[list, str]:
        """Scores texts; returns ([(label, score) or exception per text], fingerprint).

        Raises InferenceUnavailable when no stream is up. An item the service
        refused (full queue, deadline passed) comes back as InferenceRejected.
        """
        if self._stream is None:
            raise InferenceUnavailable(f"the inference service at {self.target} is not reachable")
        fingerprint = self.model.fingerprint
        loop = asyncio.get_running_loop()
        timeout_ms = max(1, int(timeout * 1000)) if timeout else 0
        ids, futures = [], []
        for text in texts:
            item_id = next(self._ids)
            future = loop.create_future()
            self._pending[item_id] = future
            self._outgoing.append(inference_pb2.ScoreItem(id=item_id, text=text, timeout_ms=timeout_ms))
            ids.append(item_id)
            futures.append(future)
        self._send_wakeup.set()
        try:
            done, not_done = await asyncio.wait(futures, timeout=timeout)
        except asyncio.CancelledError:
            self._abandon(ids)  # nobody waits any more: let the service skip them
            raise
        if not_done:
            self._abandon(ids)
        results = []
        for future in futures:
            if not future.done():
                results.append(InferenceRejected(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while the model was busy"))
            elif future.exception() is not None:
                results.append(future.exception())
            else:
                results.append(future.result())
        return results, fingerprint

    def _abandon(self, ids: list[int]) -> None:
        for item_id in ids:
            future = self._pending.pop(item_id, None)
            if future is not None:
                future.cancel()
                self._cancels.append(item_id)
        self._send_wakeup.set()

    async def _maintain(self) -> None:
        backoff = 0.05
        while not self._closed:
            sender = None
            try:
                info = await self._stub.Describe(inference_pb2.DescribeRequest(), timeout=self._describe_timeout_s)
                model = RemoteModel(info.model_id, tuple(info.labels), info.fingerprint, info.device, info.dtype)
                if self.model is not None and self.model.fingerprint != model.fingerprint:
                    log.warning("inference model changed: %s -> %s", self.model.display, model.display)
                if model != self.model:  # keep the same object otherwise: callers compare by identity
                    self.model = model
                stream = self._stub.Score()
                sender = asyncio.create_task(self._send(stream))
                self._stream = stream
                self._connected.set()
                self._changed()
                log.info("connected to inference service %s (%s)", self.target, model.display)
                backoff = 0.05
                async for response in stream:
                    self._deliver(response)
                log.warning("inference service %s closed the stream", self.target)
            except grpc.aio.AioRpcError as exc:
                if self._stream is not None:
                    log.warning("inference stream to %s broke: %s", self.target, exc.code().name)
            finally:
                was_connected = self._stream is not None
                self._stream = None
                self._remote_depth = 0
                self._connected.clear()
                if was_connected:
                    self._changed()
                if sender is not None:
                    sender.cancel()
                self._fail_pending()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def _deliver(self, response: inference_pb2.ScoreResponse) -> None:
        self._remote_depth = response.queue_depth
        for result in response.results:
            future = self._pending.pop(result.id, None)
            if future is None or future.done():
                continue
            if result.code == 0:
                future.set_result((result.label, result.score))
            else:
                code = _CODES.get(result.code, grpc.StatusCode.UNKNOWN)
                future.set_exception(InferenceRejected(code, result.message))

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        self._outgoing.clear()
        self._cancels.clear()
        for future in pending.values():
            if not future.done():
                future.set_exception(InferenceUnavailable(f"lost the inference service at {self.target}"))

    async def _send(self, stream) -> None:
        try:
            while True:
                await self._send_wakeup.wait()
                self._send_wakeup.clear()
                while self._outgoing or self._cancels:
                    end, size = 0, 0
                    while end < len(self._outgoing) and size < _MESSAGE_TEXT_BYTES:
                        size += len(self._outgoing[end].text)
                        end += 1
                    items = self._outgoing[:end]
                    del self._outgoing[:end]
                    cancels, self._cancels = self._cancels, []
                    await stream.write(inference_pb2.ScoreRequest(items=items, cancel_ids=cancels))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            log.debug("inference stream write failed: %s", exc)
