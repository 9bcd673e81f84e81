"""Faults with real processes: Redis and the inference service die and come back."""

from __future__ import annotations

import time

import grpc
import pytest
import redis

from protos import classifier_pb2
from tests.helpers import eventually
from tests.test_e2e_tiers import redis_key

L1, L3, MODEL = classifier_pb2.TIER_L1, classifier_pb2.TIER_L3, classifier_pb2.TIER_MODEL


def test_redis_killed_calls_keep_succeeding_and_l3_returns_when_redis_does(procs, connect, tmp_path, tiny_model,
                                                                           redis_server):
    inference = procs.inference(tiny_model)
    gateway = procs.gateway(inference, tmp_path / "l2", redis_server.url)
    client = connect(gateway)
    fingerprint = client.stats().model.rpartition("@")[2]
    assert client.classify("before the outage").tier == MODEL

    redis_server.kill()
    started = time.perf_counter()
    for i in range(20):
        assert client.classify(f"during the outage {i}").tier == MODEL
        assert client.classify("before the outage").tier == L1
    per_call_ms = (time.perf_counter() - started) * 1000 / 40
    assert per_call_ms < 100, f"{per_call_ms:.1f} ms per call with Redis down"

    redis_server.start()
    r = redis.Redis.from_url(redis_server.url)
    # After the breaker's cooldown, model answers land in Redis again.
    counter = iter(range(10_000))

    def written_to_l3() -> bool:
        text = f"after the outage {next(counter)}"
        client.classify(text)
        return eventually(lambda: r.exists(redis_key(fingerprint, text)), timeout_s=0.5)

    eventually(written_to_l3, timeout_s=30, interval_s=0.2)
    r.close()


def test_l3_is_shared_by_gateways_on_different_hosts(procs, connect, tmp_path, tiny_model, redis_server):
    inference = procs.inference(tiny_model)
    host_a = connect(procs.gateway(inference, tmp_path / "host-a", redis_server.url))
    host_b = connect(procs.gateway(inference, tmp_path / "host-b", redis_server.url))
    first = host_a.classify("seen on host a first")
    assert first.tier == MODEL
    fingerprint = first.model.rpartition("@")[2]
    r = redis.Redis.from_url(redis_server.url)
    eventually(lambda: r.exists(redis_key(fingerprint, "seen on host a first")))
    r.close()
    second = host_b.classify("seen on host a first")
    assert (second.tier, second.label) == (L3, first.label)


def test_inference_down_hits_served_misses_unavailable_then_recovered(procs, connect, tmp_path, tiny_model):
    inference = procs.inference(tiny_model)
    client = connect(procs.gateway(inference, tmp_path / "l2"))
    cached = client.classify("cached before the crash")

    inference.kill()
    hit = client.classify("cached before the crash")
    assert (hit.tier, hit.label) == (L1, cached.label)
    with pytest.raises(grpc.RpcError) as err:
        client.classify("a new text while the model is down")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "not reachable; cached texts are still served" in err.value.details()
    assert "Traceback" not in err.value.details()

    inference.start()  # same port; the gateway reconnects by itself
    recovered = eventually(lambda: client.classify("a new text while the model is down"), timeout_s=30)
    assert recovered.tier == MODEL
    assert client.classify("cached before the crash").tier == L1


def test_expired_and_cancelled_calls_cost_no_forward_pass(procs, connect, tmp_path, tiny_model):
    import asyncio

    from protos import classifier_pb2_grpc
    from tests.helpers import inference_counters

    # A one-second batch window: texts sit in the queue long enough to expire or be cancelled.
    inference = procs.inference(tiny_model, "--max-wait-ms", "1000")
    client = connect(procs.gateway(inference, tmp_path / "l2"))

    with pytest.raises(grpc.RpcError) as err:
        client.classify("expires while queued", timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    # The expired text leaves the queue, unscored, when its batch window closes.
    eventually(lambda: inference_counters(inference.address).get("queue_depth", 0) == 0)

    async def cancel_while_queued():
        async with grpc.aio.insecure_channel(client.channel._channel.target().decode()) as channel:
            call = classifier_pb2_grpc.ClassifierStub(channel).Classify(
                classifier_pb2.ClassifyRequest(text="cancelled while queued"))
            while inference_counters(inference.address).get("queue_depth", 0) < 1:
                await asyncio.sleep(0.01)
            call.cancel()

    asyncio.run(cancel_while_queued())
    # Whether a text is dropped as expired or as cancelled depends on who notices first; neither is scored.
    def dropped() -> dict:
        c = inference_counters(inference.address)
        return c if c.get("dropped_expired", 0) + c.get("dropped_cancelled", 0) == 2 else None

    assert eventually(dropped).get("texts_scored", 0) == 0
