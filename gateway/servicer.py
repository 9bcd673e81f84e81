"""gRPC handlers for tiergate.v1.Classifier and GatewayAdmin.

Thin on purpose: convert protobuf to plain values, call gateway.classifier,
convert back. Handlers are registered by hand with identity (de)serializers:
- a repeat lookup is answered from ResponseMemo without parsing the request or
  serializing a response (the hit path is most of the traffic);
- requests are parsed here, so a parse failure (e.g. invalid UTF-8 in a string
  field) becomes INVALID_ARGUMENT; grpc.aio's own parsing would answer UNKNOWN
  with internal text.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from cache import Answer
from gateway.classifier import Classifier
from gateway.errors import InvalidInput, abort_with, status_for
from gateway.memo import ResponseMemo, unary_request_bytes
from protos import classifier_pb2

__all__ = ["CLASSIFIER_SERVICE", "ADMIN_SERVICE", "ClassifierHandlers"]

log = logging.getLogger(__name__)

CLASSIFIER_SERVICE = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
ADMIN_SERVICE = classifier_pb2.DESCRIPTOR.services_by_name["GatewayAdmin"].full_name

_STREAM_WINDOW = 256  # requests of one stream in flight at once; more wait (flow control)
_MALFORMED = "the request could not be parsed: every text must be valid UTF-8"

ClassifyRequest = classifier_pb2.ClassifyRequest
ClassifyBatchRequest = classifier_pb2.ClassifyBatchRequest
ClassifyResponse = classifier_pb2.ClassifyResponse


def _parse(message_cls, data: bytes):
    try:
        return message_cls.FromString(data)
    except DecodeError:
        raise InvalidInput(_MALFORMED) from None


class ClassifierHandlers:
    def __init__(self, core: Classifier, memo: ResponseMemo,
                 stats_source: Callable[[], tuple[dict[str, int], int]] | None = None) -> None:
        self.core = core
        self.memo = memo
        self.counters: Counter[str] = Counter()
        self._stats_source = stats_source

    def _current_memo(self) -> ResponseMemo | None:
        """The memo, emptied first if the model changed; None before any model is known."""
        model = self.core.inference.model
        memo = self.memo
        if model is not memo.model:
            memo.use_model(model)
        return memo if model is not None else None

    def _remember(self, request_bytes: bytes, normalized: str, answer: Answer) -> None:
        # Only what L1 holds for the current model goes in (the memo is part of L1).
        memo = self.memo
        if memo.model is not None and memo.model is self.core.inference.model and self.core.held_in_l1(normalized):
            memo.put(request_bytes, answer.entry.label, answer.entry.score)

    @staticmethod
    def _response(answer: Answer, model: str) -> classifier_pb2.ClassifyResponse:
        entry = answer.entry
        return ClassifyResponse(label=entry.label, score=entry.score, tier=int(answer.source), model=model)

    async def _fail(self, context, exc: BaseException) -> None:
        self.counters[f"errors_{status_for(exc)[0].name.lower()}"] += 1
        await abort_with(context, exc)

    async def _classify_one(self, data: bytes, timeout: float | None, where: str = "") -> bytes:
        request = _parse(ClassifyRequest, data)
        try:
            text = self.core.normalize(request.text)
        except InvalidInput as exc:
            raise InvalidInput(f"{where}{exc}") from None
        (answer,) = await self.core.classify([text], timeout)
        self._remember(data, text, answer)
        return self._response(answer, self.core.model_display).SerializeToString()

    async def classify(self, data: bytes, context) -> bytes:
        memo = self._current_memo()
        if memo is not None:
            found = memo.get(data)
            if found is not None:
                memo.hits += 1
                return found[0]
        self.counters["classify_slow_path"] += 1
        try:
            return await self._classify_one(data, context.time_remaining())
        except Exception as exc:
            await self._fail(context, exc)

    async def classify_batch(self, data: bytes, context) -> bytes:
        try:
            texts = _parse(ClassifyBatchRequest, data).texts
            self.core.check_batch_size(len(texts))
            memo = self._current_memo()
            if memo is not None and texts:
                parts = []
                for text in texts:
                    found = memo.get(unary_request_bytes(text.encode()))
                    if found is None:
                        break
                    parts.append(found[1])
                else:  # every text was a memo hit: the response is their framed bytes
                    memo.hits += len(parts)
                    return b"".join(parts)
            self.counters["batch_slow_path"] += 1
            normalized = [self.core.normalize(t, i) for i, t in enumerate(texts)]
            answers = await self.core.classify(normalized, context.time_remaining()) if texts else []
        except Exception as exc:
            await self._fail(context, exc)
        model = self.core.model_display
        for text, norm, answer in zip(texts, normalized, answers):
            self._remember(unary_request_bytes(text.encode()), norm, answer)
        return classifier_pb2.ClassifyBatchResponse(results=[self._response(a, model) for a in answers]).SerializeToString()

    async def classify_stream(self, request_iterator, context):
        # Responses go out in request order, but up to _STREAM_WINDOW requests
        # are resolved concurrently, so several misses share the model's
        # batches. A memo hit is queued as ready bytes, with no task at all.
        window: asyncio.Queue = asyncio.Queue(_STREAM_WINDOW)

        async def read() -> None:
            index = 0
            async for data in request_iterator:
                memo = self._current_memo()
                found = memo.get(data) if memo is not None else None
                if found is not None:
                    memo.hits += 1
                    await window.put(found[0])
                else:
                    where = f"stream request #{index}: "
                    await window.put(asyncio.ensure_future(self._classify_one(data, context.time_remaining(), where)))
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
                    except Exception as exc:
                        await self._fail(context, exc)
                yield item
        finally:
            reader.cancel()
            while not window.empty():
                task = window.get_nowait()
                if isinstance(task, asyncio.Future):
                    task.cancel()

    async def get_stats(self, request, context):
        counters, workers = self._stats_source() if self._stats_source else (dict(self.counters), 1)
        model = self.core.inference.model
        return classifier_pb2.GatewayStats(
            counters=counters, model=self.core.model_display, workers=workers,
            model_dtype=model.dtype if model else "", model_device=model.device if model else "",
        )

    def generic_handlers(self) -> list[grpc.GenericRpcHandler]:
        # No (de)serializers: handlers take and return bytes.
        classify = grpc.unary_unary_rpc_method_handler(self.classify)
        batch = grpc.unary_unary_rpc_method_handler(self.classify_batch)
        stream = grpc.stream_stream_rpc_method_handler(self.classify_stream)
        stats = grpc.unary_unary_rpc_method_handler(
            self.get_stats, classifier_pb2.GetStatsRequest.FromString, classifier_pb2.GatewayStats.SerializeToString
        )
        return [
            grpc.method_handlers_generic_handler(
                CLASSIFIER_SERVICE, {"Classify": classify, "ClassifyBatch": batch, "ClassifyStream": stream}
            ),
            grpc.method_handlers_generic_handler(ADMIN_SERVICE, {"GetStats": stats}),
        ]
