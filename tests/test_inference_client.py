"""The gateway's client for the inference stream, against a small scripted
Inference service on a real gRPC port (a unit test of the client: the real
service is in the e2e tests)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from cache.upstream import Scored
from inference.client import HOLD_DEPTH, HOLD_S, InferenceClient
from protos import inference_pb2, inference_pb2_grpc


class ScriptedService(inference_pb2_grpc.InferenceServicer):
    """Scores every text at once as ("positive", 0.5) and reports the queue depth it is told to."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.messages: list[int] = []  # texts per Score message received

    async def Describe(self, request, context):
        return inference_pb2.ModelInfo(model_id="scripted", labels=["negative", "positive"], fingerprint="f" * 16,
                                       device="cpu", dtype="float32")

    async def Score(self, request_iterator, context):
        async for request in request_iterator:
            if request.items:
                self.messages.append(len(request.items))
                yield inference_pb2.ScoreResponse(
                    results=[inference_pb2.ScoreResult(id=i.id, label="positive", score=0.5) for i in request.items],
                    fingerprint="f" * 16, queue_depth=self.depth)


@contextlib.asynccontextmanager
async def scripted_client(depth: int):
    """A connected InferenceClient and its ScriptedService, after one warm-up
    text (whose answer tells the client the service's queue depth)."""
    service = ScriptedService(depth)
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = InferenceClient(f"127.0.0.1:{port}")
    client.start()
    try:
        await client.wait_connected(10)
        await client.score(["warm-up"], None)
        yield client, service
    finally:
        await client.close()
        await server.stop(0)


async def _first_message_after_warm_up(depth: int, texts: int, gap_s: float) -> tuple[int, list]:
    """Texts sent one every gap_s after the warm-up: how many the first message after it held."""
    async with scripted_client(depth) as (client, service):
        calls = []
        for i in range(texts):
            calls.append(asyncio.ensure_future(client.score([f"text {i}"], None)))
            await asyncio.sleep(gap_s)
        outcomes = [outcome for call in calls for outcome in await call]
        return service.messages[1], outcomes


def test_texts_go_out_at_once_while_the_service_has_no_backlog():
    first, outcomes = asyncio.run(_first_message_after_warm_up(depth=0, texts=4, gap_s=HOLD_S / 4))
    assert first == 1
    assert all(isinstance(o, Scored) and o.label == "positive" for o in outcomes)


def test_texts_share_a_message_while_the_service_reports_a_backlog():
    # They would wait in its queue anyway: the client holds them HOLD_S, so
    # one message carries several (fewer wake-ups on both sides per text).
    first, outcomes = asyncio.run(_first_message_after_warm_up(depth=HOLD_DEPTH, texts=4, gap_s=HOLD_S / 4))
    assert first >= 2
    assert len(outcomes) == 4 and all(isinstance(o, Scored) for o in outcomes)


@pytest.mark.parametrize("depth", [HOLD_DEPTH - 1, HOLD_DEPTH])
def test_a_held_text_still_meets_a_short_deadline_it_can_meet(depth):
    # The hold is a few ms: a caller with a 1 s deadline is answered either way.
    async def run() -> list:
        async with scripted_client(depth) as (client, _service):
            return await client.score(["soon"], time.monotonic() + 1.0)

    (outcome,) = asyncio.run(run())
    assert isinstance(outcome, Scored)
