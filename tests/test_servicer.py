"""The gateway's handlers on a real gRPC server (port 0) over the real cache
core, with an in-memory Upstream: hit path, streams with per-text errors,
junk requests, model changes."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2

from cache import MemoryTier, TieredCache
from gateway.classifier import Classifier, Limits
from gateway.servicer import ClassifierHandlers, render_l1
from protos import classifier_pb2 as pb
from cache.upstream import Failed, Scored
from protos.errors import DeadlineExceeded, Overloaded
from protos.health import HealthService
from tests.support.fake_upstream import MODEL, OTHER_MODEL, FakeUpstream, label_for, score_for

CLASSIFY = "/tiergate.v1.Classifier/Classify"
BATCH = "/tiergate.v1.Classifier/ClassifyBatch"
STREAM = "/tiergate.v1.Classifier/ClassifyStream"
STATS = "/tiergate.v1.GatewayAdmin/GetStats"
CHECK = "/grpc.health.v1.Health/Check"


def _raw(x: bytes) -> bytes:
    return x


@contextlib.asynccontextmanager
async def gateway(upstream: FakeUpstream, limits: Limits = Limits()):
    cache = TieredCache(MemoryTier(1000, render_l1), upstream)
    core = Classifier(cache, upstream, limits)
    handlers = ClassifierHandlers(core)
    health = HealthService()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([*handlers.generic_handlers(), health.generic_handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, core
    finally:
        await channel.close()
        await server.stop(0)
        await cache.close()


def unary(channel, method=CLASSIFY):
    return channel.unary_unary(method, request_serializer=_raw, response_deserializer=_raw)


def test_repeat_lookups_come_from_l1_for_every_spelling_of_a_text():
    async def main():
        async with gateway(FakeUpstream()) as (channel, core):
            call = unary(channel)
            first = pb.ClassifyResponse.FromString(await call(pb.ClassifyRequest(text="good  movie").SerializeToString()))
            assert (first.label, first.tier, first.model) == (label_for("good movie"), pb.TIER_MODEL, MODEL.display)
            for spelling in ("good movie", " good movie ", "good\tmovie"):
                again = pb.ClassifyResponse.FromString(await call(pb.ClassifyRequest(text=spelling).SerializeToString()))
                assert (again.label, again.score, again.tier) == (first.label, first.score, pb.TIER_L1)
                assert again.model == MODEL.display
            assert core.fast_hits == 1  # the normalized spelling took the raw-bytes path

    asyncio.run(main())


def test_a_stream_reports_per_text_failures_in_band_and_goes_on():
    """Issue 9 item 8: one failed text must not end a ClassifyStream."""

    def outcome(text, deadline):
        if text.startswith("busy"):
            return Failed(Overloaded("the model is saturated; retry with backoff"))
        if text.startswith("late"):
            return Failed(DeadlineExceeded("deadline exceeded before the model could score the text"))
        return Scored(label_for(text), score_for(text), MODEL)

    async def main():
        async with gateway(FakeUpstream(outcome=outcome)) as (channel, _core):
            texts = [f"text {i}" for i in range(40)] + ["busy 1", "", "late 1", "x" * 9000] + \
                    [f"more {i}" for i in range(40)]
            requests = [pb.ClassifyRequest(text=t) for t in texts]
            call = channel.stream_stream(STREAM, request_serializer=pb.ClassifyRequest.SerializeToString,
                                         response_deserializer=pb.ClassifyResponse.FromString)
            responses = [r async for r in call(iter(requests))]
            assert len(responses) == len(texts)  # one per request, nothing dropped
            codes = {}
            for text, response in zip(texts, responses):
                if response.HasField("error"):
                    codes[text[:10]] = grpc.StatusCode(next(c.value for c in grpc.StatusCode
                                                           if c.value[0] == response.error.code)).name
                    assert response.label == "" and response.error.message
                else:
                    assert (response.label, response.score) == (label_for(text), pytest.approx(score_for(text)))
            assert codes == {"busy 1": "RESOURCE_EXHAUSTED", "": "INVALID_ARGUMENT", "late 1": "DEADLINE_EXCEEDED",
                             "x" * 10: "INVALID_ARGUMENT"}

    asyncio.run(main())


def test_a_stream_message_that_is_not_a_request_ends_the_stream_with_invalid_argument():
    async def main():
        async with gateway(FakeUpstream()) as (channel, _core):
            call = channel.stream_stream(STREAM, request_serializer=_raw, response_deserializer=_raw)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call(iter([pb.ClassifyRequest(text="ok").SerializeToString(), b"\xff\xff\xff"])):
                    pass
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a tiergate.v1.ClassifyRequest" in info.value.details()

    asyncio.run(main())


@pytest.mark.parametrize("method,junk", [(STATS, b"\xff\xff\xff\xff"), (CHECK, b"\x0a\xff"), (CLASSIFY, b"\x12\xff"),
                                         (BATCH, b"\xff\x00")])
def test_junk_requests_get_invalid_argument_with_no_internals(method, junk, caplog):
    """Issue 9 item 11."""

    async def main():
        async with gateway(FakeUpstream()) as (channel, _core):
            for _ in range(20):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await unary(channel, method)(junk)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                details = info.value.details()
                assert "Error" not in details and "Traceback" not in details and "Exception" not in details

    asyncio.run(main())
    assert "Traceback" not in caplog.text


def test_invalid_utf8_in_a_batch_names_the_text():
    async def main():
        async with gateway(FakeUpstream()) as (channel, _core):
            good = pb.ClassifyBatchRequest(texts=["fine", "also fine"]).SerializeToString()
            data = good + b"\x0a\x03\xff\xfe\xfd"  # a third text that is not UTF-8
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(channel, BATCH)(data)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "texts[2]" in info.value.details()

    asyncio.run(main())


def test_a_new_model_empties_l1_and_answers_report_the_model_that_scored_them():
    """Issue 9 item 7, second half: no old answer survives a model change."""

    async def main():
        up = FakeUpstream()
        async with gateway(up) as (channel, core):
            call = unary(channel)
            request = pb.ClassifyRequest(text="switch").SerializeToString()
            assert pb.ClassifyResponse.FromString(await call(request)).model == MODEL.display
            assert pb.ClassifyResponse.FromString(await call(request)).tier == pb.TIER_L1
            up.switch_model(OTHER_MODEL)
            after = pb.ClassifyResponse.FromString(await call(request))
            assert (after.model, after.tier) == (OTHER_MODEL.display, pb.TIER_MODEL)
            assert len(core.cache.l1) == 1

    asyncio.run(main())


def test_an_answer_in_flight_across_a_model_change_reports_its_own_model():
    async def main():
        gate = asyncio.Event()
        up = FakeUpstream(gate=gate)
        async with gateway(up) as (channel, _core):
            call = unary(channel)
            pending = asyncio.ensure_future(call(pb.ClassifyRequest(text="in flight").SerializeToString()))
            while not up.calls:
                await asyncio.sleep(0.001)
            up.switch_model(OTHER_MODEL)  # the gateway now serves another model...
            gate.set()
            response = pb.ClassifyResponse.FromString(await pending)
            assert response.model == MODEL.display  # ...but this text was scored by the old one

    asyncio.run(main())


def test_deadlines_of_any_size_work(caplog):
    """Issue 9 item 6: deadlines beyond 49.7 days, and tiny ones."""

    async def main():
        async with gateway(FakeUpstream()) as (channel, _core):
            call = unary(channel)
            for i, timeout in enumerate((60 * 86400.0, 5 * 365 * 86400.0, None)):
                reply = pb.ClassifyResponse.FromString(
                    await call(pb.ClassifyRequest(text=f"long {i}").SerializeToString(), timeout=timeout))
                assert reply.tier == pb.TIER_MODEL

    asyncio.run(main())


def test_health_watch_reports_changes_and_ends_at_shutdown():
    async def main():
        health = HealthService()
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([health.generic_handler()])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = channel.unary_stream("/grpc.health.v1.Health/Watch",
                                         request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                         response_deserializer=health_pb2.HealthCheckResponse.FromString)
            call = watch(health_pb2.HealthCheckRequest(service=""))
            seen = [(await call.read()).status]
            await health.set("", health_pb2.HealthCheckResponse.SERVING)
            seen.append((await call.read()).status)
            await health.enter_graceful_shutdown()
            seen.append((await call.read()).status)
            assert await asyncio.wait_for(call.read(), 2) == grpc.aio.EOF  # the stream ends by itself
            assert await call.code() == grpc.StatusCode.OK
        S = health_pb2.HealthCheckResponse
        assert seen == [S.NOT_SERVING, S.SERVING, S.NOT_SERVING]
        await server.stop(0)

    asyncio.run(main())


def test_a_batch_of_l1_hits_is_answered_in_order_from_l1():
    async def main():
        async with gateway(FakeUpstream()) as (channel, core):
            texts = ["one", "two", "three", "two"]
            batch = unary(channel, BATCH)
            first = pb.ClassifyBatchResponse.FromString(
                await batch(pb.ClassifyBatchRequest(texts=texts).SerializeToString()))
            assert [r.tier for r in first.results] == [pb.TIER_MODEL] * 4
            again = pb.ClassifyBatchResponse.FromString(
                await batch(pb.ClassifyBatchRequest(texts=texts).SerializeToString()))
            assert [(r.label, r.tier, r.model) for r in again.results] == \
                [(label_for(t), pb.TIER_L1, MODEL.display) for t in texts]
            assert core.fast_hits == 4

    asyncio.run(main())
