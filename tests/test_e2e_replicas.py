"""A gateway spreading misses over several inference replicas."""

from __future__ import annotations

import asyncio

import grpc

from protos import classifier_pb2, classifier_pb2_grpc
from tests.helpers import inference_counters

MODEL = classifier_pb2.TIER_MODEL


def classify_many(address: str, texts: list[str]) -> list[classifier_pb2.ClassifyResponse]:
    async def run():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            return await asyncio.gather(*(stub.Classify(classifier_pb2.ClassifyRequest(text=t), timeout=20) for t in texts))

    return asyncio.run(run())


def test_misses_spread_over_replicas_and_survive_one_dying(procs, tmp_path, tiny_model):
    # A slow batch window keeps texts queued, so the replicas' queue depths differ and both get work.
    a = procs.inference(tiny_model, "--max-wait-ms", "50", "--max-batch-texts", "8")
    b = procs.inference(tiny_model, "--max-wait-ms", "50", "--max-batch-texts", "8")
    gateway = procs.start("gateway", "--port", "0", "--workers", "1", "--no-l2",
                          "--inference", f"{a.address},{b.address}")

    answers = classify_many(gateway.address, [f"spread text {i}" for i in range(200)])
    assert all(r.tier == MODEL for r in answers)
    scored_a = inference_counters(a.address)["texts_scored"]
    scored_b = inference_counters(b.address)["texts_scored"]
    assert scored_a + scored_b == 200
    assert min(scored_a, scored_b) >= 20, (scored_a, scored_b)

    a.kill()
    answers = classify_many(gateway.address, [f"after a died {i}" for i in range(50)])
    assert all(r.tier == MODEL for r in answers)
    assert inference_counters(b.address)["texts_scored"] == scored_b + 50


def test_texts_in_flight_on_a_dying_replica_are_resent(procs, tmp_path, tiny_model):
    # Replica a holds each batch for a second, so the call is still in flight on it when it dies.
    a = procs.inference(tiny_model, "--max-wait-ms", "1000", "--max-batch-texts", "64")
    b = procs.inference(tiny_model)
    gateway = procs.start("gateway", "--port", "0", "--workers", "1", "--no-l2",
                          "--inference", f"{a.address},{b.address}")

    async def run():
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            # Equal replicas share calls at random: send new texts until one is held on a.
            for attempt in range(50):
                text = f"caught in the crash {attempt}"
                call = asyncio.ensure_future(stub.Classify(classifier_pb2.ClassifyRequest(text=text), timeout=20))
                while not call.done() and inference_counters(a.address).get("queue_depth", 0) == 0:
                    await asyncio.sleep(0.01)
                if not call.done():
                    a.kill()
                    return await call, attempt
            raise AssertionError("no call of 50 went to replica a")

    answer, went_to_b_first = asyncio.run(run())
    assert answer.tier == MODEL
    assert inference_counters(b.address)["texts_scored"] == went_to_b_first + 1  # + the one resent from a
