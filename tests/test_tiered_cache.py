"""The tiered lookup over real tiers: read-through order, promotion, write-back
to every tier, single-flight, failures and cancellation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis

from cache import (
    Answer,
    Entry,
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
)
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401

MiB = 1 << 20
KEYER = Keyer("test-model@1")


def key(text: str) -> bytes:
    return KEYER.key(text)


def entry_for(text: str) -> Entry:
    return Entry(f"label:{text}", 0.5)


class Model:
    """A scorer that records its calls; optionally waits for `gate`."""

    def __init__(self, gate: asyncio.Event | None = None, cacheable: bool = True) -> None:
        self.calls: list[list[str]] = []
        self.gate = gate
        self.cacheable = cacheable

    async def __call__(self, texts: list[str]) -> Scored:
        self.calls.append(list(texts))
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(0)
        return Scored([entry_for(t) for t in texts], cacheable=self.cacheable)


def l2_tier(path: Path) -> LmdbTier:
    return LmdbTier(LmdbConfig(path, max_bytes=4 * MiB, map_size=64 * MiB, sync_interval_s=0.05))


def l3_tier(server: RedisServer) -> RedisTier:
    return RedisTier(RedisConfig(server.url, timeout_s=2.0))


def redis_keys(server: RedisServer) -> set[bytes]:
    client = redis.Redis.from_url(server.url, socket_timeout=5)
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
        l1, l2, l3 = MemoryTier(100), l2_tier(tmp_path), l3_tier(redis_server)
        cache = TieredCache(l1, l2, l3, KeyFilter(1000))
        model = Model()
        try:
            l1.put(k1, entry_for("in l1"))
            l2.put_many_nowait([(k2, entry_for("in l2"))])
            assert l2.flush(5)
            cache.refresh_filter()  # learn what was written to L2 behind the cache's back
            await l3.put_many([(k3, entry_for("in l3"))])

            answers = await cache.resolve([k1, k2, k3, k4], texts, model)
            assert answers == [
                Answer(entry_for("in l1"), Source.L1),
                Answer(entry_for("in l2"), Source.L2),
                Answer(entry_for("in l3"), Source.L3),
                Answer(entry_for("nowhere"), Source.MODEL),
            ]
            assert model.calls == [["nowhere"]]  # only what no tier held
            c = cache.counters
            assert (c["hits_l1"], c["hits_l2"], c["hits_l3"], c["misses"], c["model_texts"]) == (1, 1, 1, 1, 1)

            # Promotion: the L2 and L3 hits are now in L1; the L3 hit in L2 too.
            assert l1.get(k2) == entry_for("in l2")
            assert l1.get(k3) == entry_for("in l3")
            assert l2.flush(5)
            assert l2.get_many_sync([k3]) == [entry_for("in l3")]
            # The model's answer went to every tier: L1 at once, L2 and L3 in the background.
            assert l1.get(k4) == entry_for("nowhere")
            assert l2.get_many_sync([k4]) == [entry_for("nowhere")]
            assert await poll(lambda: b"tg:" + k4 in redis_keys(redis_server))

            # Asked again, everything is an L1 hit and the model is not called.
            again = await cache.resolve([k4, k3, k2, k1], texts[::-1], model)
            assert [a.source for a in again] == [Source.L1] * 4
            assert len(model.calls) == 1
        finally:
            await cache.close()

    asyncio.run(main())


def test_fifty_concurrent_callers_of_a_new_key_call_the_model_once(tmp_path, redis_server):
    async def main():
        cache = TieredCache(MemoryTier(100), l2_tier(tmp_path), l3_tier(redis_server), KeyFilter(1000))
        model = Model()
        try:
            k = key("hot")
            results = await asyncio.gather(*(cache.resolve([k], ["hot"], model) for _ in range(50)))
            assert model.calls == [["hot"]]
            assert all(r == [Answer(entry_for("hot"), Source.MODEL)] for r in results)
            assert cache.counters["singleflight_joined"] == 49
            assert cache._inflight == {}  # done futures are removed
        finally:
            await cache.close()

    asyncio.run(main())


def test_duplicates_in_one_call_are_scored_once_and_answered_in_order():
    async def main():
        cache = TieredCache(MemoryTier(100))
        model = Model()
        texts = ["a", "b", "a", "c", "a", "b"]
        answers = await cache.resolve([key(t) for t in texts], texts, model)
        assert model.calls == [["a", "b", "c"]]  # one call, each text once
        assert [a.entry for a in answers] == [entry_for(t) for t in texts]
        assert all(a.source is Source.MODEL for a in answers)
        assert cache.counters["duplicates"] == 3
        await cache.close()

    asyncio.run(main())


def test_concurrent_callers_with_overlapping_keys_share_the_scoring():
    async def main():
        cache = TieredCache(MemoryTier(100))
        gate = asyncio.Event()
        model = Model(gate)
        first = asyncio.ensure_future(cache.resolve([key("a"), key("b")], ["a", "b"], model))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(cache.resolve([key("b"), key("c")], ["b", "c"], model))
        await asyncio.sleep(0)
        gate.set()
        a, b = await asyncio.gather(first, second)
        assert model.calls == [["a", "b"], ["c"]]  # "b" is scored once, by the first caller
        assert [x.entry for x in a] == [entry_for("a"), entry_for("b")]
        assert [x.entry for x in b] == [entry_for("b"), entry_for("c")]
        await cache.close()

    asyncio.run(main())


def test_a_scorer_exception_reaches_every_waiter():
    async def main():
        cache = TieredCache(MemoryTier(100))
        calls = 0

        async def broken(texts: list[str]) -> Scored:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.01)
            raise ConnectionError("inference service down")

        k = key("doomed")
        results = await asyncio.gather(*(cache.resolve([k], ["doomed"], broken) for _ in range(10)),
                                       return_exceptions=True)  # fmt: skip
        assert calls == 1
        assert all(isinstance(r, ConnectionError) for r in results)
        assert cache._inflight == {}  # nothing left hanging
        assert cache.counters["model_errors"] == 1
        # Nothing was cached, and the next caller tries again.
        model = Model()
        assert await cache.resolve([k], ["doomed"], model) == [Answer(entry_for("doomed"), Source.MODEL)]
        assert model.calls == [["doomed"]]
        await cache.close()

    asyncio.run(main())


def test_a_per_text_exception_fails_only_the_callers_of_that_text():
    async def main():
        cache = TieredCache(MemoryTier(100))

        async def half(texts: list[str]) -> Scored:
            await asyncio.sleep(0)
            return Scored([entry_for(t) if t != "bad" else ValueError("too long") for t in texts])

        both = asyncio.ensure_future(cache.resolve([key("good"), key("bad")], ["good", "bad"], half))
        await asyncio.sleep(0)
        good_only = asyncio.ensure_future(cache.resolve([key("good")], ["good"], half))
        with pytest.raises(ValueError, match="too long"):
            await both
        assert await good_only == [Answer(entry_for("good"), Source.MODEL)]
        assert cache.l1.get(key("bad")) is None
        await cache.close()

    asyncio.run(main())


def test_a_cancelled_leader_caller_does_not_break_the_followers():
    async def main():
        cache = TieredCache(MemoryTier(100))
        gate = asyncio.Event()
        model = Model(gate)
        k = key("slow")
        leader = asyncio.ensure_future(cache.resolve([k], ["slow"], model))
        await asyncio.sleep(0)
        followers = [asyncio.ensure_future(cache.resolve([k], ["slow"], model)) for _ in range(3)]
        await asyncio.sleep(0)
        assert len(model.calls) == 1
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        gate.set()
        for f in followers:
            assert await f == [Answer(entry_for("slow"), Source.MODEL)]
        assert len(model.calls) == 1
        assert cache.l1.get(k) == entry_for("slow")  # the work was kept, not thrown away
        await cache.close()

    asyncio.run(main())


def test_a_cancelled_caller_whose_key_then_fails_leaves_nothing_behind():
    async def main():
        cache = TieredCache(MemoryTier(100))
        gate = asyncio.Event()

        async def broken(texts: list[str]) -> Scored:
            await gate.wait()
            raise RuntimeError("boom")

        caller = asyncio.ensure_future(cache.resolve([key("x")], ["x"], broken))
        await asyncio.sleep(0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        gate.set()
        assert await poll(lambda: not cache._inflight and not cache._leaders)
        await cache.close()

    # Any "exception was never retrieved" would go to the loop's handler: fail on it.
    errors: list[dict] = []

    async def guarded():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        await main()

    asyncio.run(guarded())
    import gc

    gc.collect()
    assert errors == []


def test_key_filter_skips_l2_for_unknown_keys_and_counts_it(tmp_path):
    async def main():
        l2 = l2_tier(tmp_path)
        k = key("behind the filter's back")
        l2.put_many_nowait([(k, entry_for("l2"))])
        assert l2.flush(5)
        # No warm-up, no refresh: the filter cannot know the key.
        cache = TieredCache(MemoryTier(100), l2, None, KeyFilter(1000), filter_refresh_s=None)
        model = Model()
        try:
            answers = await cache.resolve([k], ["behind the filter's back"], model)
            assert answers[0].source is Source.MODEL  # an extra model call, never a wrong answer
            assert cache.counters["filter_skips_l2"] == 1
            assert l2.counters["hits"] + l2.counters["misses"] == 0  # L2 was not read
        finally:
            await cache.close()

    asyncio.run(main())


def test_warm_filter_and_refresh_learn_l2_keys(tmp_path):
    async def main():
        l2 = l2_tier(tmp_path)
        old = [key(f"old {i}") for i in range(20)]
        l2.put_many_nowait([(k, entry_for("old")) for k in old])
        assert l2.flush(5)
        cache = TieredCache(MemoryTier(100), l2, None, KeyFilter(1000), filter_refresh_s=None)
        model = Model()
        try:
            assert cache.warm_filter() == 20
            assert [a.source for a in await cache.resolve(old[:2], ["old 0", "old 1"], model)] == [Source.L2] * 2
            # Written later by another process sharing L2 (same effect here):
            new = key("new")
            l2.put_many_nowait([(new, entry_for("new"))])
            assert l2.flush(5)
            assert cache.refresh_filter() >= 1
            assert (await cache.resolve([new], ["new"], model))[0].source is Source.L2
            assert model.calls == []
            assert cache.counters["filter_skips_l2"] == 0
        finally:
            await cache.close()

    asyncio.run(main())


def test_not_cacheable_answers_are_served_but_stored_nowhere(tmp_path, redis_server):
    async def main():
        l1, l2 = MemoryTier(100), l2_tier(tmp_path)
        cache = TieredCache(l1, l2, l3_tier(redis_server), KeyFilter(1000))
        model = Model(cacheable=False)
        k = key("model swapped mid-flight")
        answers = await cache.resolve([k], ["model swapped mid-flight"], model)
        assert answers == [Answer(entry_for("model swapped mid-flight"), Source.MODEL)]
        assert len(l1) == 0
        assert l2.flush(5) and len(l2) == 0
        await cache.close()  # waits for background L3 writes: there must be none
        assert cache.counters["writes_l2"] == cache.counters["writes_l3"] == 0
        assert redis_keys(redis_server) == set()

    asyncio.run(main())


def test_close_waits_for_background_l3_writes(tmp_path, redis_server):
    async def main():
        cache = TieredCache(MemoryTier(100), None, l3_tier(redis_server))
        texts = [f"t{i}" for i in range(10)]
        await cache.resolve([key(t) for t in texts], texts, Model())
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

    async def close(self):
        pass


def test_background_l3_writes_are_bounded_and_never_block_responses():
    async def main():
        l3 = StuckL3(max_pending=5)
        cache = TieredCache(MemoryTier(100), None, l3)  # type: ignore[arg-type]
        model = Model()
        for i in range(12):
            start = time.perf_counter()
            await cache.resolve([key(f"w{i}")], [f"w{i}"], model)
            assert time.perf_counter() - start < 0.5  # the stuck write is not on this path
        # One write is out (stuck), five wait behind it, the rest were dropped.
        assert cache.counters["writes_dropped"] == 6
        l3.release.set()
        await cache.close()
        assert l3.written == 6

    asyncio.run(main())


def test_peek_l1_is_the_sync_fast_path():
    async def main():
        cache = TieredCache(MemoryTier(100))
        k = key("p")
        assert cache.peek_l1(k) is None
        await cache.resolve([k], ["p"], Model())
        assert cache.peek_l1(k) == entry_for("p")
        assert cache.counters["hits_l1"] == 1
        await cache.close()

    asyncio.run(main())


def test_resolve_checks_its_arguments():
    async def main():
        cache = TieredCache(MemoryTier(10))
        with pytest.raises(ValueError, match="2 keys and 1 texts"):
            await cache.resolve([key("a"), key("b")], ["a"], Model())
        assert await cache.resolve([], [], Model()) == []
        await cache.close()

    asyncio.run(main())


def test_scoring_stops_when_every_caller_has_gone_and_restarts_for_a_newcomer():
    scorer_cancelled = asyncio.Event()

    class Blocking:
        calls = 0

        async def __call__(self, texts):
            Blocking.calls += 1
            try:
                await asyncio.Event().wait()  # the model never answers
            except asyncio.CancelledError:
                scorer_cancelled.set()
                raise

    async def body():
        cache = TieredCache(MemoryTier(10))
        scorer = Blocking()
        first = asyncio.ensure_future(cache.resolve([key("x")], ["x"], scorer))
        second = asyncio.ensure_future(cache.resolve([key("x")], ["x"], scorer))
        await asyncio.sleep(0.01)
        first.cancel()
        await asyncio.sleep(0.01)
        assert not scorer_cancelled.is_set()  # `second` still waits
        second.cancel()
        await asyncio.wait_for(scorer_cancelled.wait(), 1)
        assert cache.counters["abandoned"] == 1
        # A newcomer starts afresh rather than joining the abandoned lookup.
        (answer,) = await cache.resolve([key("x")], ["x"], Model())
        assert answer == Answer(entry_for("x"), Source.MODEL)
        await cache.close()

    asyncio.run(body())
