"""gRPC handlers for tiergate.v1.Classifier and GatewayAdmin.

Thin on purpose: convert protobuf to plain values, call gateway.classifier,
convert back. Handlers are registered by hand (not through the generated
add_*_to_server) so requests are parsed by our own deserializer: grpc.aio
turns a parse failure, e.g. invalid UTF-8 in a string field, into UNKNOWN with
internal text, and callers should get INVALID_ARGUMENT instead.
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
from protos import classifier_pb2

__all__ = ["CLASSIFIER_SERVICE", "ADMIN_SERVICE", "ClassifierHandlers"]

log = logging.getLogger(__name__)

CLASSIFIER_SERVICE = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
ADMIN_SERVICE = classifier_pb2.DESCRIPTOR.services_by_name["GatewayAdmin"].full_name

_STREAM_WINDOW = 256  # requests of one stream in flight at once; more wait (flow control)


class _Malformed:
    """Stands in for a request that did not parse."""


MALFORMED = _Malformed()


def _lenient_parser(message_cls) -> Callable[[bytes], object]:
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError:
            return MALFORMED

    return parse


_MALFORMED_MESSAGE = "the request could not be parsed: every text must be valid UTF-8"


class ClassifierHandlers:
    def __init__(self, core: Classifier, stats_source: Callable[[], dict[str, int]] | None = None) -> None:
        self.core = core
        self.counters: Counter[str] = Counter()
        self._stats_source = stats_source

    def _response(self, answer: Answer, model: str) -> classifier_pb2.ClassifyResponse:
        entry = answer.entry
        return classifier_pb2.ClassifyResponse(label=entry.label, score=entry.score, tier=int(answer.source), model=model)

    async def _fail(self, context, exc: BaseException) -> None:
        self.counters[f"errors_{status_for(exc)[0].name.lower()}"] += 1
        await abort_with(context, exc)

    async def classify(self, request, context):
        self.counters["calls_classify"] += 1
        try:
            if request is MALFORMED:
                raise InvalidInput(_MALFORMED_MESSAGE)
            text = self.core.normalize(request.text)
            (answer,) = await self.core.classify([text], context.time_remaining())
        except Exception as exc:
            await self._fail(context, exc)
        return self._response(answer, self.core.model_display)

    async def classify_batch(self, request, context):
        self.counters["calls_classify_batch"] += 1
        try:
            if request is MALFORMED:
                raise InvalidInput(_MALFORMED_MESSAGE)
            self.core.check_batch_size(len(request.texts))
            texts = [self.core.normalize(t, i) for i, t in enumerate(request.texts)]
            answers = await self.core.classify(texts, context.time_remaining()) if texts else []
        except Exception as exc:
            await self._fail(context, exc)
        model = self.core.model_display
        return classifier_pb2.ClassifyBatchResponse(results=[self._response(a, model) for a in answers])

    async def classify_stream(self, request_iterator, context):
        self.counters["calls_classify_stream"] += 1
        # Requests are answered in order, but up to _STREAM_WINDOW of them are
        # resolved concurrently, so a slow miss does not stall the hits behind it
        # any longer than ordering requires.
        window: asyncio.Queue = asyncio.Queue(_STREAM_WINDOW)

        async def one(request, index: int) -> classifier_pb2.ClassifyResponse:
            if request is MALFORMED:
                raise InvalidInput(f"stream request #{index}: {_MALFORMED_MESSAGE}")
            try:
                text = self.core.normalize(request.text)
            except InvalidInput as exc:
                raise InvalidInput(f"stream request #{index}: {exc}") from None
            (answer,) = await self.core.classify([text], context.time_remaining())
            return self._response(answer, self.core.model_display)

        async def read() -> None:
            index = 0
            async for request in request_iterator:
                await window.put(asyncio.ensure_future(one(request, index)))
                index += 1
            await window.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                task = await window.get()
                if task is None:
                    break
                try:
                    response = await task
                except Exception as exc:
                    await self._fail(context, exc)
                self.counters["stream_messages"] += 1
                yield response
        finally:
            reader.cancel()
            while not window.empty():
                task = window.get_nowait()
                if task is not None:
                    task.cancel()

    async def get_stats(self, request, context):
        counters = dict(self._stats_source() if self._stats_source else self.counters)
        return classifier_pb2.GatewayStats(counters=counters, model=self.core.model_display, workers=1)

    def generic_handlers(self) -> list[grpc.GenericRpcHandler]:
        def serializer(message) -> bytes:
            return message.SerializeToString()

        classify = grpc.unary_unary_rpc_method_handler(
            self.classify, _lenient_parser(classifier_pb2.ClassifyRequest), serializer
        )
        batch = grpc.unary_unary_rpc_method_handler(
            self.classify_batch, _lenient_parser(classifier_pb2.ClassifyBatchRequest), serializer
        )
        stream = grpc.stream_stream_rpc_method_handler(
            self.classify_stream, _lenient_parser(classifier_pb2.ClassifyRequest), serializer
        )
        stats = grpc.unary_unary_rpc_method_handler(
            self.get_stats, classifier_pb2.GetStatsRequest.FromString, serializer
        )
        return [
            grpc.method_handlers_generic_handler(
                CLASSIFIER_SERVICE, {"Classify": classify, "ClassifyBatch": batch, "ClassifyStream": stream}
            ),
            grpc.method_handlers_generic_handler(ADMIN_SERVICE, {"GetStats": stats}),
        ]
