"""Trust, end to end (real inference service, real gateway, real LMDB and
Redis): deadlines of every size, callers that share a text, garbage in Redis."""

from __future__ import annotations

import asyncio
import math
import random

import grpc
import pytest
import redis

from protos import classifier_pb2 as pb
from protos import classifier_pb2_grpc
from tests.helpers import eventually
from tests.test_e2e_tiers import redis_key


async def _classify(stub, text: str, timeout: float | None):
    try:
        return await stub.Classify(pb.ClassifyRequest(text=text), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code()


@pytest.fixture
def stack(procs, tmp_path, tiny_model):
    inference = procs.inference(tiny_model, "--max-wait-ms", "20")
    return procs.gateway(inference, tmp_path / "l2", None, "--max-pending-misses", "256")


def test_a_short_deadline_never_fails_a_long_caller_of_the_same_text(stack):
    """Issue 9 item 5: pairs of callers of one new text, 5 ms and 30 s."""

    async def main():
        async with grpc.aio.insecure_channel(stack.address) as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            short_codes = set()
            for i in range(20):
                text = f"pair {i} {random.random()}"
                short, long = await asyncio.gather(_classify(stub, text, 0.005), _classify(stub, text, 30))
                assert isinstance(long, pb.ClassifyResponse), f"round {i}: the 30 s caller got {long}"
                short_codes.add(short.name if isinstance(short, grpc.StatusCode) else "OK")
            assert short_codes <= {"OK", "DEADLINE_EXCEEDED"}

    asyncio.run(main())


def test_tiny_deadlines_get_deadline_exceeded_and_nothing_else(stack):
    async def main():
        async with grpc.aio.insecure_channel(stack.address) as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            results = await asyncio.gather(*(_classify(stub, f"tiny {i} {random.random()}", (1 + i % 10) / 1000)
                                             for i in range(200)))
            codes = {r.name if isinstance(r, grpc.StatusCode) else "OK" for r in results}
            assert codes <= {"OK", "DEADLINE_EXCEEDED"}, codes

    asyncio.run(main())


def test_deadlines_beyond_fifty_days_work_and_leave_no_slot_behind(stack, connect):
    """Issue 9 item 6: a uint32 of milliseconds overflows at ~49.7 days."""
    days = 86400.0

    async def main():
        async with grpc.aio.insecure_channel(stack.address) as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            for timeout in (50 * days, 365 * days, 10_000 * days):
                results = await asyncio.gather(*(_classify(stub, f"long {timeout} {i}", timeout) for i in range(200)))
                assert all(isinstance(r, pb.ClassifyResponse) and r.tier == pb.TIER_MODEL for r in results), \
                    {r for r in results if not isinstance(r, pb.ClassifyResponse)}

    asyncio.run(main())
    # 600 misses through a bound of 256: a leaked slot per call would refuse these.
    client = connect(stack)
    assert eventually(lambda: client.stats().counters["pending_misses"] == 0)
    assert client.classify("after the long ones").tier == pb.TIER_MODEL


def test_garbage_in_redis_is_never_served_nor_copied_to_l2(procs, connect, tmp_path, tiny_model, redis_server):
    """Issue 9 item 2, end to end."""
    inference = procs.inference(tiny_model)
    clean = connect(procs.gateway(inference, None, None))
    gateway = procs.gateway(inference, tmp_path / "l2", redis_server.url)
    client = connect(gateway)
    fingerprint = client.stats().model.rpartition("@")[2]
    r = redis.Redis.from_url(redis_server.url)
    garbage = [b"\x00\x00\x80\x7fage!", b"\x00\x00\xc0\x7fpositive", b"", b"\xff" * 40, b"LABEL_9" * 1000,
               b"\x01" + b"\x00" * 30]
    texts = [f"poisoned text {i}" for i in range(len(garbage))]
    for text, junk in zip(texts, garbage):
        r.set(redis_key(fingerprint, text), junk)
    for text in texts:
        got, truth = client.classify(text), clean.classify(text)
        assert (got.tier, got.label, got.score) == (pb.TIER_MODEL, truth.label, truth.score)
        assert 0.0 <= got.score <= 1.0 and not math.isnan(got.score)
    stats = client.stats().counters
    assert stats["bad_values_l3"] == len(garbage)
    r.flushall()
    r.close()
    # A second gateway process on the same L2 (a fresh L1) serves what L2 holds: the true answers.
    other = connect(procs.gateway(inference, tmp_path / "l2", None))
    for text in texts:
        again, truth = other.classify(text), clean.classify(text)
        assert (again.tier, again.label) == (pb.TIER_L2, truth.label)


def test_with_a_cache_secret_values_forged_without_it_are_refused(procs, connect, tmp_path, tiny_model,
                                                                 redis_server):
    """Issue 9 items 2 and 12: a MAC keyed by a secret that never appears on a command line."""
    import time

    from cache import Entry, Keyer, ValueCodec

    secret = "a-cache-secret-of-some-length-42"
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    inference = procs.inference(tiny_model)
    gateway = procs.gateway(inference, tmp_path / "l2", redis_server.url, "--cache-secret-file", str(secret_file),
                            workers=2)
    client = connect(gateway)
    model = client.stats().model
    fingerprint = model.rpartition("@")[2]
    truth = client.classify("forge me")
    key = Keyer(fingerprint).key("forge me")
    # What a Redis writer without the secret can make: a well-formed value with a valid checksum.
    wrong = "positive" if truth.label == "negative" else "negative"
    forged = ValueCodec(("negative", "positive")).encode(key, Entry(wrong, 0.99, time.time() + 3600))
    r = redis.Redis.from_url(redis_server.url)
    assert r.exists(b"tg:" + key)  # the gateway's own (authenticated) value was there
    r.set(b"tg:" + key, forged)
    r.close()
    other = connect(procs.gateway(inference, tmp_path / "other-l2", redis_server.url,
                                  "--cache-secret-file", str(secret_file)))
    got = other.classify("forge me")
    assert (got.tier, got.label) == (pb.TIER_MODEL, truth.label)
    assert other.stats().counters["bad_values_l3"] == 1
    for pid in _tree(gateway.proc.pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert secret.encode() not in f.read()


def _tree(root: int) -> list[int]:
    """root and every descendant (from /proc)."""
    import os

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out
