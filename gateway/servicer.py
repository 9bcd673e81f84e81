"""gRPC handlers for tiergate.v1.Classifier and GatewayAdmin.

Thin on purpose: convert protobuf to plain values, call gateway.classifier,
convert back. Handlers are registered by hand with identity (de)serializers:
- a repeat lookup is answered from L1's rendered response, hashed straight
  from the request's bytes, without parsing it or serializing anything;
- requests are parsed here, so a parse failure (invalid UTF-8 in a string
  field, junk bytes) becomes INVALID_ARGUMENT naming the text; grpc.aio's own
  parsing would answer UNKNOWN with internal text.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from time import perf_counter
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from cache import Entry, ModelRef
from cache.tiered import Answer
from gateway.classifier import Classifier
from gateway.metrics import CallMetrics, code_of, ended_code
from protos.wire import field1_values
from protos import classifier_pb2
from protos.errors import InvalidInput, abort_with, status_for

__all__ = ["CLASSIFIER_SERVICE", "ADMIN_SERVICE", "ClassifierHandlers", "render_l1"]

log = logging.getLogger(__name__)

CLASSIFIER_SERVICE = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
ADMIN_SERVICE = classifier_pb2.DESCRIPTOR.services_by_name["GatewayAdmin"].full_name

_METHODS = (
    (CLASSIFIER_SERVICE, "Classify", "unary"),
    (CLASSIFIER_SERVICE, "ClassifyBatch", "unary"),
    (CLASSIFIER_SERVICE, "ClassifyStream", "bidi_stream"),
    (ADMIN_SERVICE, "GetStats", "unary"),
)

_STREAM_WINDOW = 256  # requests of one stream in flight at once; more wait (flow control)

ClassifyRequest = classifier_pb2.ClassifyRequest
ClassifyBatchRequest = classifier_pb2.ClassifyBatchRequest
ClassifyResponse = classifier_pb2.ClassifyResponse


class _MalformedStream(InvalidInput):
    """A stream message that is not a ClassifyRequest at all: ends the stream."""


def render_l1(entry: Entry, model: ModelRef) -> bytes:
    """The response bytes L1 keeps next to an answer (MemoryTier's renderer)."""
    return ClassifyResponse(label=entry.label, score=entry.score, tier=classifier_pb2.TIER_L1,
                            model=model.display).SerializeToString()


def _response(answer: Answer) -> ClassifyResponse:
    return ClassifyResponse(label=answer.label, score=answer.score, tier=int(answer.source),
                            model=answer.model.display)


def _decode_text(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{where} is not valid UTF-8; send text as UTF-8") from None


def _unary_text(data: bytes) -> bytes | None:
    """The text bytes of a ClassifyRequest as clients encode it, or None."""
    # The common case first: one record of a text under 128 bytes.
    if len(data) >= 2 and data[0] == 0x0A and data[1] < 0x80 and len(data) == data[1] + 2:
        return data[2:]
    values = field1_values(data)
    if values is None:
        return None
    return values[-1] if values else b""  # protobuf: the last value of a repeated scalar wins


class ClassifierHandlers:
    def __init__(self, core: Classifier,
                 stats_source: Callable[[], tuple[dict[str, int], int]] | None = None, *,
                 call_metrics: bool = False) -> None:
        """call_metrics: time and count every call by method and status (gateway.metrics)."""
        self.core = core
        self.counters: Counter[str] = Counter()
        self._stats_source = stats_source
        self.calls: dict[str, CallMetrics] = {}
        if call_metrics:
            for service, method, kind in _METHODS:
                self.calls[method] = CallMetrics(kind, service, method)

    def _text_of(self, data: bytes, where: str = "text") -> str:
        raw = _unary_text(data)
        if raw is not None:
            return _decode_text(raw, where)
        try:
            return ClassifyRequest.FromString(data).text
        except DecodeError:
            raise _MalformedStream(f"{where}: the message is not a tiergate.v1.ClassifyRequest") from None

    def _count_error(self, exc: BaseException) -> None:
        self.counters[f"errors_{status_for(exc)[0].name.lower()}"] += 1

    async def _fail(self, context, exc: BaseException) -> None:
        self._count_error(exc)
        await abort_with(context, exc)

    async def _classify_one(self, data: bytes, deadline: float, where: str = "text") -> bytes:
        text = self.core.normalize(self._text_of(data, where))
        (answer,) = await self.core.classify([text], deadline)
        return _response(answer).SerializeToString()

    async def classify(self, data: bytes, context) -> bytes:
        raw = _unary_text(data)
        if raw is not None:
            found = self.core.hit(raw)
            if found is not None:
                return found
        self.counters["classify_slow_path"] += 1
        try:
            return await self._classify_one(data, self.core.deadline(context.time_remaining()))
        except Exception as exc:
            await self._fail(context, exc)

    def _batch_texts(self, data: bytes) -> list:
        try:
            return list(ClassifyBatchRequest.FromString(data).texts)
        except DecodeError:
            pass
        values = field1_values(data)
        if values is None:
            raise InvalidInput("the request is not a tiergate.v1.ClassifyBatchRequest") from None
        for i, raw in enumerate(values):
            _decode_text(raw, f"texts[{i}]")  # raises, naming the first invalid text
        raise InvalidInput("the request could not be parsed")  # not reached: protobuf found a bad string

    async def classify_batch(self, data: bytes, context) -> bytes:
        core = self.core
        try:
            texts = self._batch_texts(data)
            core.check_batch_size(len(texts))
            if texts:
                parts = core.hit_many(texts)
                if parts is not None:  # every text was an L1 hit: the response is their framed bytes
                    return b"".join(parts)
            self.counters["batch_slow_path"] += 1
            normalized = [core.normalize(t, i) for i, t in enumerate(texts)]
            answers = await core.classify(normalized, core.deadline(context.time_remaining())) if texts else []
        except Exception as exc:
            await self._fail(context, exc)
        return classifier_pb2.ClassifyBatchResponse(results=[_response(a) for a in answers]).SerializeToString()

    def _item_error(self, exc: BaseException) -> bytes:
        self._count_error(exc)
        code, message = status_for(exc)
        return ClassifyResponse(error=classifier_pb2.ItemError(code=code.value[0], message=message)).SerializeToString()

    async def _stream_item(self, data: bytes, deadline: float, where: str) -> bytes:
        try:
            return await self._classify_one(data, deadline, where)
        except _MalformedStream:
            raise
        except Exception as exc:
            return self._item_error(exc)

    async def classify_stream(self, request_iterator, context):
        # Responses go out in request order, but up to _STREAM_WINDOW requests
        # are resolved concurrently, so several misses share the model's
        # batches. An L1 hit is queued as ready bytes, with no task at all. A
        # text without an answer gets an in-band error and the stream goes on.
        window: asyncio.Queue = asyncio.Queue(_STREAM_WINDOW)
        core = self.core

        async def read() -> None:
            index = 0
            async for data in request_iterator:
                raw = _unary_text(data)
                found = core.hit(raw) if raw is not None else None
                if found is not None:
                    await window.put(found)
                else:
                    where = f"stream request #{index}"
                    deadline = core.deadline(context.time_remaining())
                    await window.put(asyncio.ensure_future(self._stream_item(data, deadline, where)))
                index += 1
            await window.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await window.get()
                if item is None:
                    break
                if not isinstance(item, bytes):
                    try:
                        item = await item
                    except Exception as exc:  # a malformed message: the stream cannot go on
                        await self._fail(context, exc)
                yield item
            await reader  # re-raises what ended the reading, if anything did
        finally:
            reader.cancel()
            while not window.empty():
                task = window.get_nowait()
                if isinstance(task, asyncio.Future):
                    task.cancel()

    async def get_stats(self, data: bytes, context) -> bytes:
        try:
            classifier_pb2.GetStatsRequest.FromString(data)
        except DecodeError:
            await self._fail(context, InvalidInput("the request is not a tiergate.v1.GetStatsRequest"))
        counters, workers = self._stats_source() if self._stats_source else (dict(self.counters), 1)
        model = self.core.current_model()
        return classifier_pb2.GatewayStats(
            counters=counters, model=model.display if model else "", workers=workers,
            model_dtype=model.dtype if model else "", model_device=model.device if model else "",
        ).SerializeToString()

    def _unary(self, method: str, handler):
        call = self.calls.get(method)
        if call is None:
            return grpc.unary_unary_rpc_method_handler(handler)

        async def timed(data: bytes, context) -> bytes:
            started = perf_counter()
            call.started += 1
            try:
                response = await handler(data, context)
            except BaseException as exc:
                call.done(started, code_of(exc, context))
                raise
            call.done(started)
            return response

        return grpc.unary_unary_rpc_method_handler(timed)

    def _stream(self, method: str, handler):
        call = self.calls.get(method)
        if call is None:
            return grpc.stream_stream_rpc_method_handler(handler)

        async def timed(request_iterator, context):
            started = perf_counter()
            call.started += 1
            try:
                async for response in handler(request_iterator, context):
                    yield response
            except BaseException as exc:
                call.done(started, code_of(exc, context))
                raise
            call.done(started, ended_code(context))

        return grpc.stream_stream_rpc_method_handler(timed)

    def generic_handlers(self) -> list[grpc.GenericRpcHandler]:
        # No (de)serializers: handlers take and return bytes.
        classify = self._unary("Classify", self.classify)
        batch = self._unary("ClassifyBatch", self.classify_batch)
        stream = self._stream("ClassifyStream", self.classify_stream)
        stats = self._unary("GetStats", self.get_stats)
        return [
            grpc.method_handlers_generic_handler(
                CLASSIFIER_SERVICE, {"Classify": classify, "ClassifyBatch": batch, "ClassifyStream": stream}
            ),
            grpc.method_handlers_generic_handler(ADMIN_SERVICE, {"GetStats": stats}),
        ]
