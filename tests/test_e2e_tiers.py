"""The whole request path with real processes: inference service, gateway, LMDB, Redis."""

from __future__ import annotations

import asyncio
import shutil

import grpc
import pytest
import redis

from cache import Keyer, normalize_text
from protos import classifier_pb2, classifier_pb2_grpc
from tests.helpers import describe_model, eventually, inference_counters

L1, L2, L3, MODEL = (classifier_pb2.TIER_L1, classifier_pb2.TIER_L2, classifier_pb2.TIER_L3, classifier_pb2.TIER_MODEL)


def redis_key(fingerprint: str, text: str) -> bytes:
    return b"tg:" + Keyer(fingerprint).key(normalize_text(text))


def test_each_tier_answers_in_turn_and_a_new_model_scores_again(procs, connect, tmp_path, tiny_model,
                                                                other_tiny_model, redis_server):
    lmdb = tmp_path / "l2"
    inference = procs.inference(tiny_model)
    model_a = describe_model(inference.address)
    gateway = procs.gateway(inference, lmdb, redis_server.url)
    client = connect(gateway)
    text = "The refund arrived quickly and the support team was kind"

    first = client.classify(text)
    assert first.tier == MODEL
    assert first.model == f"tiny-bert-seed0@{model_a.fingerprint}"
    assert first.label in ("negative", "positive") and 0.5 <= first.score <= 1.0
    second = client.classify(text)
    assert (second.tier, second.label) == (L1, first.label)
    assert second.score == pytest.approx(first.score)
    # The same text spelled with other whitespace is the same cache entry.
    assert client.classify("  The refund arrived quickly\tand the support team was kind ").tier == L1

    gateway.restart()  # L1 is empty in the new process; L2 persisted on disk
    client = connect(gateway)
    assert client.classify(text).tier == L2
    assert client.classify(text).tier == L1  # promoted

    r = redis.Redis.from_url(redis_server.url)
    eventually(lambda: r.exists(redis_key(model_a.fingerprint, text)))
    gateway.stop()
    shutil.rmtree(lmdb)
    gateway.start()
    client = connect(gateway)
    from_l3 = client.classify(text)
    assert (from_l3.tier, from_l3.label) == (L3, first.label)
    assert client.classify(text).tier == L1

    # Another model on the same port: the gateway notices the new fingerprint
    # on reconnect and never serves the old model's answers for it.
    inference.kill()
    inference.args = ["inference", "--model", str(other_tiny_model), "--port", "0"]
    inference.start()
    model_b = describe_model(inference.address)
    assert model_b.fingerprint != model_a.fingerprint
    eventually(lambda: client.stats().model.endswith(model_b.fingerprint))
    rescored = client.classify(text)
    assert rescored.tier == MODEL
    assert rescored.model == f"tiny-bert-seed1@{model_b.fingerprint}"
    r.close()


def test_no_tier_stores_the_raw_text(procs, connect, tmp_path, tiny_model, redis_server):
    lmdb = tmp_path / "l2"
    inference = procs.inference(tiny_model)
    gateway = procs.gateway(inference, lmdb, redis_server.url)
    secret = "card 4111-1111-1111-1111 belongs to Jane Q. Example"
    connect(gateway).classify(secret)
    fingerprint = describe_model(inference.address).fingerprint
    r = redis.Redis.from_url(redis_server.url)
    eventually(lambda: r.exists(redis_key(fingerprint, secret)))
    for key in r.keys("*"):
        assert b"4111" not in key and b"4111" not in r.get(key)
    r.close()
    gateway.stop()  # flushes L2
    for f in lmdb.iterdir():
        assert b"4111-1111" not in f.read_bytes()


def test_fifty_concurrent_calls_with_one_new_text_run_the_model_once(procs, tiny_model, tmp_path):
    inference = procs.inference(tiny_model)
    gateway = procs.gateway(inference, tmp_path / "l2")
    before = inference_counters(inference.address).get("texts_scored", 0)

    async def fifty() -> list[classifier_pb2.ClassifyResponse]:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            request = classifier_pb2.ClassifyRequest(text="a brand new text nobody has scored")
            return await asyncio.gather(*(stub.Classify(request, timeout=10) for _ in range(50)))

    answers = asyncio.run(fifty())
    assert len({(a.label, a.score) for a in answers}) == 1
    assert inference_counters(inference.address)["texts_scored"] - before == 1


def test_batch_mixing_hits_and_misses_keeps_order_and_tiers(procs, connect, tmp_path, tiny_model):
    inference = procs.inference(tiny_model)
    client = connect(procs.gateway(inference, tmp_path / "l2"))
    warm = client.batch(["alpha text", "gamma text"])
    assert [r.tier for r in warm] == [MODEL, MODEL]

    texts = ["alpha text", "beta text", "gamma text", "delta text", "beta text"]
    results = client.batch(texts)
    assert [r.tier for r in results] == [L1, MODEL, L1, MODEL, MODEL]
    assert (results[0].label, results[0].score) == (warm[0].label, pytest.approx(warm[0].score))
    assert (results[2].label, results[2].score) == (warm[1].label, pytest.approx(warm[1].score))
    assert (results[1].label, results[1].score) == (results[4].label, results[4].score)
    # Each result is the one for its own text: the same texts one by one agree.
    for text, result in zip(texts, results):
        single = client.classify(text)
        assert (single.label, single.score) == (result.label, pytest.approx(result.score))
    assert client.batch([]) == []


def test_stream_answers_in_request_order(procs, tmp_path, tiny_model):
    inference = procs.inference(tiny_model)
    gateway = procs.gateway(inference, tmp_path / "l2")
    texts = [f"stream text {i % 7}" for i in range(40)]
    with grpc.insecure_channel(gateway.address) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        replies = list(stub.ClassifyStream(iter(classifier_pb2.ClassifyRequest(text=t) for t in texts), timeout=20))
        singles = [stub.Classify(classifier_pb2.ClassifyRequest(text=t), timeout=10) for t in texts]
    assert len(replies) == len(texts)
    assert [(r.label, round(r.score, 5)) for r in replies] == [(s.label, round(s.score, 5)) for s in singles]
    assert all(s.tier == L1 for s in singles)
