"""The tiered lookup over real tiers (real LMDB, real Redis) and a fake
Upstream: read-through order, promotion, write-back, single-flight, per-caller
deadlines, answers of another model, untrusted values, bounds, cancellation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis

from cache import (
    Answer,
    CacheOptions,
    Entry,
    Failed,
    Keyer,
    KeyFilter,
    LmdbConfig,
    LmdbTier,
    MemoryTier,
    RedisConfig,
    RedisTier,
    Scored,
    Source,
    TieredCache,
    ValueCodec,
)
from protos.errors import DeadlineExceeded, ModelFailed, Overloaded
from tests.support.fake_upstream import MODEL, OTHER_MODEL, FakeUpstream, label_for, score_for
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401

MiB = 1 << 20
KEYER = Keyer(MODEL.fingerprint)
CODEC = ValueCodec(MODEL.labels)
DAY = 86400.0


def key(text: str) -> bytes:
    return KEYER.key(text)


def value(text: str, expires_at: float | None = None) -> tuple[bytes, bytes, float]:
    """(key, encoded value, expiry) of the model's true answer for text, as the tiers store it."""
    expires_at = expires_at if expires_at is not None else time.time() + DAY
    k = key(text)
    return k, CODEC.encode(k, Entry(label_for(text), score_for(text), expires_at)), expires_at


def answer(text: str, source: Source, model=MODEL) -> tuple:
    return (label_for(text), score_for(text), source, model)


def seen(answers: list[Answer]) -> list[tuple]:
    return [(a.label, a.score, a.source, a.model) for a in answers]


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def l1_tier() -> MemoryTier:
    l1 = MemoryTier(100)
    l1.use_model(MODEL)
    return l1


def l2_tier(path: Path) -> LmdbTier:
    return LmdbTier(LmdbConfig(path, max_bytes=4 * MiB, map_size=64 * MiB, sync_interval_s=0.05))


def l3_tier(server: RedisServer) -> RedisTier:
    return RedisTier(RedisConfig(server.url, timeout_s=2.0))


def redis_client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=5)


def redis_keys(server: RedisServer) -> set[bytes]:
    client = redis_client(server)
    try:
        return set(client.keys(b"tg:*"))
    finally:
        client.close()


async def poll(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.005)
    return False


def test_read_through_order_promotion_and_write_back(tmp_path, redis_server):
    texts = ["in l1", "in l2", "in l3", "nowhere"]
    k1, k2, k3, k4 = (key(t) for t in texts)

    async def main():
        up = FakeUpstream()
        l1, l2, l3 = l1_tier(), l2_tier(tmp_path), l3_tier(redis_server)
        cache = TieredCache(l1, up, l2, l3, KeyFilter(1000))
        try:
            l1.put(k1, Entry(label_for("in l1"), score_for("in l1"), time.time() + DAY), MODEL)
            l2.put_many_nowait([value("in l2")])
            assert l2.flush(5)
            cache.refresh_filter()  # learn what was written to L2 behind the cache's back
            await l3.put_many([value("in l3")])

            answers = await cache.resolve([k1, k2, k3, k4], texts, MODEL, soon())
            assert seen(answers) == [answer("in l1", Source.L1), answer("in l2", Source.L2),
                                     answer("in l3", Source.L3), answer("nowhere", Source.MODEL)]
            assert up.calls == [["nowhere"]]  # only what no tier held
            c = cache.counters
            assert (c["hits_l1"], c["hits_l2"], c["hits_l3"], c["misses"], c["model_texts"]) == (1, 1, 1, 1, 1)

            # Promotion: the L2 and L3 hits are now in L1; the L3 hit in L2 too.
            assert l1.get(k2).label == label_for("in l2")
            assert l1.get(k3).label == label_for("in l3")
            assert l2.flush(5)
            assert CODEC.decode(k3, l2.get_many_sync([k3])[0], time.time()).label == label_for("in l3")
            # The model's answer went to every tier: L1 at once, L2 and L3 in the background.
            assert l1.get(k4).label == label_for("nowhere")
            assert CODEC.decode(k4, l2.get_many_sync([k4])[0], time.time()).label == label_for("nowhere")
            assert await poll(lambda: b"tg:" + k4 in redis_keys(redis_server))

            # Asked again, everything is an L1 hit and the model is not called.
            again = await cache.resolve([k4, k3, k2, k1], texts[::-1], MODEL, soon())
            assert [a.source for a in again] == [Source.L1] * 4
            assert len(up.calls) == 1
        finally:
            await cache.close()

    asyncio.run(main())


def test_a_promotion_keeps_the_remaining_lifetime(tmp_path, redis_server):
    async def main():
        l2, l3 = l2_tier(tmp_path), l3_tier(redis_server)
        cache = TieredCache(l1_tier(), FakeUpstream(), l2, l3, KeyFilter(1000))
        try:
            expires = time.time() + 60  # a minute left, though L2 would grant 7 days
            k, v, _ = value("promoted", expires)
            await l3.put_many([(k, v, expires)])
            (a,) = await cache.resolve([k], ["promoted"], MODEL, soon())
            assert a.source is Source.L3
            assert l2.flush(5)
            promoted = CODEC.decode(k, l2.get_many_sync([k])[0], time.time())
            assert promoted.expires_at == pytest.approx(expires, abs=1)
            assert 0 < redis_client(redis_server).ttl(b"tg:" + k) <= 61
        finally:
            await cache.close()

    asyncio.run(main())


GARBAGE = {
    "huge score": lambda k: CODEC.encode(k, Entry("positive", 0.5, time.time() + DAY))[:-17] + b"\x00" * 17,
    "random bytes": lambda k: b"\x93\x11garbage-garbage-garbage",
    "empty": lambda k: b"",
    "old format": lambda k: b"\x00\x00\x00\x3fpositive",
    "copied from another key": lambda k: value("another text")[1],
    "megabyte label": lambda k: b"x" * 1_000_000,
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_in_redis_is_a_miss_counted_deleted_and_never_promoted(tmp_path, redis_server, kind):
    async def main():
        up = FakeUpstream()
        l2, l3 = l2_tier(tmp_path), l3_tier(redis_server)
        cache = TieredCache(l1_tier(), up, l2, l3, KeyFilter(1000))
        client = redis_client(redis_server)
        try:
            text = f"poisoned {kind}"
            k = key(text)
            client.set(b"tg:" + k, GARBAGE[kind](k))
            (a,) = await cache.resolve([k], [text], MODEL, soon())
            assert (a.label, a.score, a.source) == (label_for(text), score_for(text), Source.MODEL)
            assert cache.counters["bad_values_l3"] == 1
            assert up.calls == [[text]]
            assert l2.flush(5)
            # What L2 holds now is the model's answer, not the garbage.
            assert CODEC.decode(k, l2.get_many_sync([k])[0], time.time()).label == label_for(text)
        finally:
            await cache.close()
            client.close()

    asyncio.run(main())


def test_a_value_of_another_secret_is_refused(tmp_path, redis_server):
    async def main():
        secret = b"s" * 32
        cache = TieredCache(l1_tier(), FakeUpstream(), None, l3_tier(redis_server),
                            options=CacheOptions(secret=secret))
        client = redis_client(redis_server)
        try:
            k, forged, _ = value("forged")  # tagged without the secret: what a writer without the key can make
            client.set(b"tg:" + k, forged)
            (a,) = await cache.resolve([k], ["forged"], MODEL, soon())
            assert a.source is Source.MODEL and cache.counters["bad_values_l3"] == 1
        finally:
            await cache.close()
            client.close()

    asyncio.run(main())


def test_bit_rot_in_l2_is_a_miss_and_the_value_is_forgotten(tmp_path):
    async def main():
        up = FakeUpstream()
        l2 = l2_tier(tmp_path)
        k, v, expires = value("rotten")
        rotten = bytearray(v)
        rotten[6] ^= 0x40  # a flipped bit in the score
        l2.put_many_nowait([(k, bytes(rotten), expires)])
        assert l2.flush(5)
        cache = TieredCache(l1_tier(), up, l2, None, KeyFilter(1000))
        cache.warm_filter()
        try:
            (a,) = await cache.resolve([k], ["rotten"], MODEL, soon())
            assert a.source is Source.MODEL and cache.counters["bad_values_l2"] == 1
            assert l2.flush(5)
            fixed = l2.get_many_sync([k])[0]
            assert CODEC.decode(k, fixed, time.time()).score == score_for("rotten")
        finally:
            await cache.close()

    asyncio.run(main())


def test_fifty_concurrent_callers_of_a_new_key_call_the_model_once(tmp_path, redis_server):
    async def main():
        up = FakeUpstream()
        cache = TieredCache(l1_tier(), up, l2_tier(tmp_path), l3_tier(redis_server), KeyFilter(1000))
        try:
            k = key("hot")
            results = await asyncio.gather(*(cache.resolve([k], ["hot"], MODEL, soon()) for _ in range(50)))
            assert up.calls == [["hot"]]
            assert all(seen(r) == [answer("hot", Source.MODEL)] for r in results)
            assert cache.counters["singleflight_joined"] == 49
            assert cache.pending == 0  # settled flights are removed
        finally:
            await cache.close()

    asyncio.run(main())


def test_duplicates_in_one_call_are_scored_once_and_answered_in_order():
    async def main():
        up = FakeUpstream()
        cache = TieredCache(l1_tier(), up)
        texts = ["a", "b", "a", "c", "a", "b"]
        answers = await cache.resolve([key(t) for t in texts], texts, MODEL, soon())
        assert up.calls == [["a", "b", "c"]]  # one call, each text once
        assert seen(answers) == [answer(t, Source.MODEL) for t in texts]
        assert cache.counters["duplicates"] == 3
        await cache.close()

    asyncio.run(main())


def test_concurrent_callers_with_overlapping_keys_share_the_scoring():
    async def main():
        gate = asyncio.Event()
        up = FakeUpstream(gate=gate)
        cache = TieredCache(l1_tier(), up)
        first = asyncio.ensure_future(cache.resolve([key("a"), key("b")], ["a", "b"], MODEL, soon()))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(cache.resolve([key("b"), key("c")], ["b", "c"], MODEL, soon()))
        await asyncio.sleep(0)
        gate.set()
        a, b = await asyncio.gather(first, second)
        assert up.calls == [["a", "b"], ["c"]]  # "b" is scored once, by the first caller
        assert seen(a) == [answer("a", Source.MODEL), answer("b", Source.MODEL)]
        assert seen(b) == [answer("b", Source.MODEL), answer("c", Source.MODEL)]
        await cache.close()

    asyncio.run(main())


def test_a_failed_text_reaches_its_every_caller_and_only_them():
    async def main():
        def outcome(text, deadline):
            return Failed(ModelFailed("the model failed")) if text == "bad" else Scored(
                label_for(text), score_for(text), MODEL)

        up = FakeUpstream(outcome=outcome)
        cache = TieredCache(l1_tier(), up)
        both = asyncio.ensure_future(cache.resolve([key("good"), key("bad")], ["good", "bad"], MODEL, soon()))
        await asyncio.sleep(0)
        bad_only = [asyncio.ensure_future(cache.resolve([key("bad")], ["bad"], MODEL, soon())) for _ in range(5)]
        good_only = asyncio.ensure_future(cache.resolve([key("good")], ["good"], MODEL, soon()))
        with pytest.raises(ModelFailed):
            await both
        for caller in bad_only:
            with pytest.raises(ModelFailed):
                await caller
        assert seen(await good_only) == [answer("good", Source.MODEL)]
        assert cache.l1.get(key("bad")) is None
        assert cache.pending == 0
        await cache.close()

    asyncio.run(main())


def test_a_short_deadline_caller_never_fails_a_long_one_on_the_same_text():
    """Issue 9 item 5: callers of one new text with 5 ms and 30 s deadlines."""

    async def main():
        gate = asyncio.Event()
        up = FakeUpstream(gate=gate)
        cache = TieredCache(l1_tier(), up)
        for round_ in range(20):
            text = f"shared {round_}"
            k = key(text)
            gate.clear()
            short = asyncio.ensure_future(cache.resolve([k], [text], MODEL, soon(0.005)))
            await asyncio.sleep(0)
            long = asyncio.ensure_future(cache.resolve([k], [text], MODEL, soon(30)))
            with pytest.raises(DeadlineExceeded):
                await short  # its own deadline, its own status
            await asyncio.sleep(0.01)  # the first send's 5 ms have passed too
            gate.set()
            assert seen(await long) == [answer(text, Source.MODEL)]
        assert cache.counters["deadline_retries"] >= 1  # resent with the longer deadline
        assert cache.pending == 0
        await cache.close()

    asyncio.run(main())


def test_tiny_and_huge_deadlines_get_their_own_correct_status():
    """Issue 9 items 5 and 6: 1-10 ms deadlines and deadlines of years."""

    async def main():
        up = FakeUpstream(gate=asyncio.Event())
        cache = TieredCache(l1_tier(), up)
        for ms in (0, 1, 2, 5, 10):
            with pytest.raises(DeadlineExceeded):
                await cache.resolve([key(f"t{ms}")], [f"t{ms}"], MODEL, soon(ms / 1000))
        assert cache.pending == 0  # no flight left behind
        up.gate.set()
        years = soon(10 * 365 * DAY)
        results = await asyncio.gather(*(cache.resolve([key(f"y{i}")], [f"y{i}"], MODEL, years) for i in range(50)))
        assert all(r[0].source is Source.MODEL for r in results)
        assert cache.pending == 0
        await cache.close()

    asyncio.run(main())


def test_an_answer_of_another_model_is_stored_under_that_model_only(tmp_path, redis_server):
    """Issue 9 item 7: a resend that lands on a replica of another fingerprint."""

    async def main():
        up = FakeUpstream()
        up.scored_by = OTHER_MODEL
        l1, l2, l3 = l1_tier(), l2_tier(tmp_path), l3_tier(redis_server)
        cache = TieredCache(l1, up, l2, l3, KeyFilter(1000))
        try:
            text = "failed over"
            (a,) = await cache.resolve([key(text)], [text], MODEL, soon())
            assert a.model == OTHER_MODEL  # reports the model that really scored it
            other_key = Keyer(OTHER_MODEL.fingerprint).key(text)
            assert key(text) not in l1 and other_key not in l1  # L1 holds MODEL's answers only
            assert l2.flush(5)
            assert l2.get_many_sync([key(text)]) == [None]
            assert l2.get_many_sync([other_key])[0] is not None
            await cache.close()
            assert redis_keys(redis_server) == {b"tg:" + other_key}
            assert cache.counters["model_other_fingerprint"] == 1
        finally:
            await cache.close()

    asyncio.run(main())


def test_new_keys_beyond_the_pending_bound_are_refused_before_any_redis_read(redis_server):
    async def main():
        gate = asyncio.Event()
        l3 = l3_tier(redis_server)
        cache = TieredCache(l1_tier(), FakeUpstream(gate=gate), None, l3, options=CacheOptions(max_pending=10))
        waiting = [asyncio.ensure_future(cache.resolve([key(f"p{i}")], [f"p{i}"], MODEL, soon())) for i in range(10)]
        await asyncio.sleep(0.05)
        reads = l3.counters["hits"] + l3.counters["misses"]
        with pytest.raises(Overloaded, match="--max-pending-misses"):
            await cache.resolve([key("one too many")], ["one too many"], MODEL, soon())
        assert l3.counters["hits"] + l3.counters["misses"] == reads  # refused before Redis
        gate.set()
        await asyncio.gather(*waiting)
        await cache.close()

    asyncio.run(main())


def test_a_cancelled_first_caller_does_not_break_the_others():
    async def main():
        gate = asyncio.Event()
        up = FakeUpstream(gate=gate)
        cache = TieredCache(l1_tier(), up)
        k = key("slow")
        first = asyncio.ensure_future(cache.resolve([k], ["slow"], MODEL, soon()))
        await asyncio.sleep(0)
        others = [asyncio.ensure_future(cache.resolve([k], ["slow"], MODEL, soon())) for _ in range(3)]
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.set()
        for other in others:
            assert seen(await other) == [answer("slow", Source.MODEL)]
        assert len(up.calls) == 1
        assert cache.l1.get(k).label == label_for("slow")  # the work was kept, not thrown away
        await cache.close()

    asyncio.run(main())


def test_scoring_stops_when_every_caller_has_gone_and_restarts_for_a_newcomer():
    async def main():
        up = FakeUpstream(gate=asyncio.Event())
        cache = TieredCache(l1_tier(), up)
        first = asyncio.ensure_future(cache.resolve([key("x")], ["x"], MODEL, soon()))
        second = asyncio.ensure_future(cache.resolve([key("x")], ["x"], MODEL, soon()))
        await asyncio.sleep(0.01)
        first.cancel()
        await asyncio.sleep(0.01)
        assert up.cancelled == 0  # `second` still waits
        second.cancel()
        assert await poll(lambda: up.cancelled == 1)
        assert cache.counters["abandoned"] == 1
        # A newcomer starts afresh rather than joining the abandoned lookup.
        up.gate.set()
        (a,) = await cache.resolve([key("x")], ["x"], MODEL, soon())
        assert a.source is Source.MODEL
        assert len(up.calls) == 2
        await cache.close()

    errors: list[dict] = []

    async def guarded():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        await main()

    asyncio.run(guarded())
    import gc

    gc.collect()
    assert errors == []  # no "exception was never retrieved"


def test_a_newcomer_never_joins_an_abandoned_flight():
    async def main():
        up = FakeUpstream(gate=asyncio.Event())
        cache = TieredCache(l1_tier(), up)
        only = asyncio.ensure_future(cache.resolve([key("z")], ["z"], MODEL, soon()))
        await asyncio.sleep(0.01)
        only.cancel()
        # Same tick as the cancellation: the flight is withdrawn, the newcomer starts its own.
        newcomer = asyncio.ensure_future(cache.resolve([key("z")], ["z"], MODEL, soon()))
        await asyncio.sleep(0.01)
        up.gate.set()
        assert seen(await newcomer) == [answer("z", Source.MODEL)]
        await cache.close()

    asyncio.run(main())


def test_key_filter_skips_l2_for_unknown_keys_and_counts_it(tmp_path):
    async def main():
        l2 = l2_tier(tmp_path)
        l2.put_many_nowait([value("behind the filter's back")])
        assert l2.flush(5)
        # No warm-up, no refresh: the filter cannot know the key.
        cache = TieredCache(l1_tier(), FakeUpstream(), l2, None, KeyFilter(1000),
                            CacheOptions(filter_refresh_s=None))
        try:
            (a,) = await cache.resolve([key("behind the filter's back")], ["behind the filter's back"], MODEL, soon())
            assert a.source is Source.MODEL  # an extra model call, never a wrong answer
            assert cache.counters["filter_skips_l2"] == 1
        finally:
            await cache.close()

    asyncio.run(main())


def test_warm_filter_and_refresh_learn_l2_keys(tmp_path):
    async def main():
        l2 = l2_tier(tmp_path)
        old = [f"old {i}" for i in range(20)]
        l2.put_many_nowait([value(t) for t in old])
        assert l2.flush(5)
        up = FakeUpstream()
        cache = TieredCache(l1_tier(), up, l2, None, KeyFilter(1000), CacheOptions(filter_refresh_s=None))
        try:
            assert cache.warm_filter() == 20
            got = await cache.resolve([key(t) for t in old[:2]], old[:2], MODEL, soon())
            assert [a.source for a in got] == [Source.L2] * 2
            # Written later by another process sharing L2 (same effect here):
            l2.put_many_nowait([value("new")])
            assert l2.flush(5)
            assert cache.refresh_filter() >= 1
            assert (await cache.resolve([key("new")], ["new"], MODEL, soon()))[0].source is Source.L2
            assert up.calls == []
            assert cache.counters["filter_skips_l2"] == 0
        finally:
            await cache.close()

    asyncio.run(main())


class CountingFilter(KeyFilter):
    """A KeyFilter that counts what it is asked (its answers are KeyFilter's)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.adds: list[bytes] = []
        self.asked = 0

    def add(self, key: bytes) -> None:
        self.adds.append(key)
        super().add(key)

    def might_contain(self, key: bytes) -> bool:
        self.asked += 1
        return super().might_contain(key)


def test_the_filter_learns_other_processes_keys_without_redoing_this_process_own(tmp_path):
    # The filter's hashing is pure Python: a miss should not pay for this
    # process's own writes twice (added when written, again when read back
    # from L2's age index), nor ask the filter again when a refresh taught it nothing.
    async def main():
        l2 = l2_tier(tmp_path)
        kf = CountingFilter(1000)
        up = FakeUpstream()
        cache = TieredCache(l1_tier(), up, l2, None, kf, CacheOptions(filter_refresh_s=3600))
        try:
            await cache.resolve([key("mine")], ["mine"], MODEL, soon())
            assert l2.flush(5)
            assert kf.adds == [key("mine")]  # once, as it was written
            assert cache.refresh_filter() == 1  # read back from the age index...
            assert kf.adds == [key("mine")]  # ...but not added again

            # A miss after a refresh that learned nothing: the filter is asked once.
            kf.asked = 0
            assert (await cache.resolve([key("new")], ["new"], MODEL, soon()))[0].source is Source.MODEL
            assert kf.asked == 1

            # Another process's write is learned on the next miss's refresh, and served from L2.
            l2.put_many_nowait([value("theirs")])  # written behind the cache's back, as by another worker
            assert l2.flush(5)
            kf.asked = 0
            assert (await cache.resolve([key("theirs")], ["theirs"], MODEL, soon()))[0].source is Source.L2
            assert key("theirs") in kf.adds
            assert kf.asked == 2  # no, refresh (learned a key), yes
            assert up.calls == [["mine"], ["new"]]

            # A key this process holds in L1 but did not write (say one whose
            # filter generation was dropped meanwhile), written by another worker: learned too.
            cache.l1.put(key("hot"), Entry(label_for("hot"), score_for("hot"), time.time() + DAY), MODEL)
            l2.put_many_nowait([value("hot")])
            assert l2.flush(5)
            assert cache.refresh_filter() == 1
            assert kf.adds[-1] == key("hot")

            # An own write, read back once, then rewritten by another worker: learned again.
            l2.put_many_nowait([value("mine")])
            assert l2.flush(5)
            assert cache.refresh_filter() == 1
            assert kf.adds[-1] == key("mine")
        finally:
            await cache.close()

    asyncio.run(main())


def test_an_own_write_l2_dropped_is_not_skipped_once_the_filter_rotated(tmp_path):
    # A write L2 never stored is never read back. Once the filter drops the
    # generation that held it, a refresh must learn the key again when
    # another worker writes it, or this process would skip L2 for it.
    async def main():
        l2 = l2_tier(tmp_path)
        kf = CountingFilter(2)  # a generation every 2 keys
        cache = TieredCache(l1_tier(), FakeUpstream(), l2, None, kf, CacheOptions(filter_refresh_s=None))
        stored = l2.put_many_nowait
        try:
            l2.put_many_nowait = lambda items: None  # dropped, as by a full write queue
            await cache.resolve([key("lost")], ["lost"], MODEL, soon())
            l2.put_many_nowait = stored
            for i in range(4):
                kf.add(key(f"filler {i}"))  # two rotations: the generation that held "lost" is gone
            assert not kf.might_contain(key("lost"))
            l2.put_many_nowait([value("lost")])  # another worker scores and stores it
            assert l2.flush(5)
            cache.refresh_filter()
            assert kf.might_contain(key("lost"))
        finally:
            l2.put_many_nowait = stored
            await cache.close()

    asyncio.run(main())


def test_close_waits_for_background_l3_writes(redis_server):
    async def main():
        cache = TieredCache(l1_tier(), FakeUpstream(), None, l3_tier(redis_server))
        texts = [f"t{i}" for i in range(10)]
        await cache.resolve([key(t) for t in texts], texts, MODEL, soon())
        await cache.close()
        assert redis_keys(redis_server) == {b"tg:" + key(t) for t in texts}

    asyncio.run(main())


class StuckL3:
    """An L3 whose writes hang: stands in for a Redis that stopped answering."""

    name = "l3"

    def __init__(self, max_pending: int) -> None:
        self.config = RedisConfig("redis://unused", max_pending_writes=max_pending)
        self.release = asyncio.Event()
        self.written = 0

    async def get_many(self, keys):
        return [None] * len(keys)

    async def put_many(self, items):
        await self.release.wait()
        self.written += len(items)

    async def forget(self, keys):
        pass

    async def close(self):
        pass


def test_background_l3_writes_are_bounded_and_never_block_responses():
    async def main():
        l3 = StuckL3(max_pending=5)
        cache = TieredCache(l1_tier(), FakeUpstream(), None, l3)  # type: ignore[arg-type]
        for i in range(12):
            (a,) = await asyncio.wait_for(cache.resolve([key(f"w{i}")], [f"w{i}"], MODEL, soon()), 2)
            assert a.source is Source.MODEL  # the stuck write is not on this path
        # One write is out (stuck), five wait behind it, the rest were dropped.
        assert cache.counters["writes_dropped"] == 6
        l3.release.set()
        await cache.close()
        assert l3.written == 6

    asyncio.run(main())


def test_closing_tells_waiting_callers_the_gateway_is_stopping():
    async def main():
        up = FakeUpstream(gate=asyncio.Event())
        cache = TieredCache(l1_tier(), up)
        caller = asyncio.ensure_future(cache.resolve([key("late")], ["late"], MODEL, soon()))
        await asyncio.sleep(0.01)
        await cache.close(timeout=0.05)
        with pytest.raises(Exception) as info:
            await caller
        assert info.value.code.name == "UNAVAILABLE" and "shutting down" in str(info.value)

    asyncio.run(main())


def test_resolve_checks_its_arguments():
    async def main():
        cache = TieredCache(l1_tier(), FakeUpstream())
        with pytest.raises(ValueError, match="2 keys and 1 texts"):
            await cache.resolve([key("a"), key("b")], ["a"], MODEL, soon())
        assert await cache.resolve([], [], MODEL, soon()) == []
        await cache.close()

    asyncio.run(main())


def test_l1_holds_one_model_and_a_new_model_empties_it():
    async def main():
        cache = TieredCache(l1_tier(), FakeUpstream())
        await cache.resolve([key("a")], ["a"], MODEL, soon())
        assert len(cache.l1) == 1
        cache.l1.use_model(OTHER_MODEL)
        assert len(cache.l1) == 0
        assert not cache.l1.put(key("b"), Entry("positive", 0.9, time.time() + 60), MODEL)  # not its model
        await cache.close()

    asyncio.run(main())



@pytest.mark.parametrize("label, score", [("NEUTRAL", 0.9), ("positive", 1.5), ("positive", float("nan"))])
def test_an_answer_outside_the_models_labels_or_range_is_refused_and_not_cached(tmp_path, label, score):
    async def main():
        up = FakeUpstream(outcome=lambda text, deadline: Scored(label, score, MODEL))
        l2 = l2_tier(tmp_path)
        cache = TieredCache(l1_tier(), up, l2, None, KeyFilter(1000))
        with pytest.raises(ModelFailed):
            await cache.resolve([key("odd")], ["odd"], MODEL, soon())
        assert key("odd") not in cache.l1
        assert l2.flush(5) and l2.get_many_sync([key("odd")]) == [None]
        await cache.close()

    asyncio.run(main())


def test_duplicates_of_a_text_held_in_l1_or_l2_are_all_answered(tmp_path):
    """Found by the chaos run: a repeat of an L1 hit in one batch was left empty."""

    async def main():
        up = FakeUpstream()
        l2 = l2_tier(tmp_path)
        l2.put_many_nowait([value("in l2")])
        assert l2.flush(5)
        cache = TieredCache(l1_tier(), up, l2, None, KeyFilter(1000))
        cache.warm_filter()
        await cache.resolve([key("in l1")], ["in l1"], MODEL, soon())
        texts = ["in l1", "new", "in l1", "in l2", "in l2", "new"]
        answers = await cache.resolve([key(t) for t in texts], texts, MODEL, soon())
        assert [(a.label, a.score) for a in answers] == [(label_for(t), score_for(t)) for t in texts]
        assert [a.source for a in answers] == [Source.L1, Source.MODEL, Source.L1, Source.L2, Source.L2, Source.MODEL]
        await cache.close()

    asyncio.run(main())
