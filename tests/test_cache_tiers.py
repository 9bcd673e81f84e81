"""The CacheTier contract, run against every tier (L1, L2 on real LMDB, L3 on a
real redis-server), plus L1's own pieces: the LRU bound and the KeyFilter."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Callable, Sequence

import pytest

from cache import CacheTier, Entry, KeyFilter, LmdbConfig, LmdbTier, MemoryTier, RedisConfig, RedisTier
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401

MiB = 1 << 20


def new_keys(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


async def get_when_stored(tier: CacheTier, keys: Sequence[bytes], expected: Sequence[Entry],
                          timeout: float = 5.0) -> list[Entry | None]:  # fmt: skip
    """Poll until the tier answers `expected`: put_many may queue (L2 does)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await tier.get_many(keys)
        if got == list(expected) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.005)


@pytest.fixture(params=["l1", "l2", "l3"])
def make_tier(request: pytest.FixtureRequest, tmp_path) -> Callable[[], CacheTier]:
    """A factory, called inside the test's event loop (Redis connections
    belong to the loop that opens them)."""
    if request.param == "l1":
        return lambda: MemoryTier(1000)
    if request.param == "l2":
        return lambda: LmdbTier(LmdbConfig(tmp_path / "l2", max_bytes=4 * MiB, map_size=64 * MiB,
                                           sync_interval_s=0.05))  # fmt: skip
    server: RedisServer = request.getfixturevalue("redis_server")
    # A generous timeout: these tests are about the contract, not about faults.
    return lambda: RedisTier(RedisConfig(server.url, timeout_s=2.0))


def test_is_a_cache_tier(make_tier):
    async def main():
        tier = make_tier()
        try:
            assert isinstance(tier, CacheTier)
            assert tier.name in ("l1", "l2", "l3")
        finally:
            await tier.close()

    asyncio.run(main())


def test_put_then_get_returns_the_entries(make_tier):
    async def main():
        tier = make_tier()
        try:
            keys = new_keys(5)
            entries = [Entry(f"label-{i}", i / 8) for i in range(5)]  # float32-exact scores
            await tier.put_many(list(zip(keys, entries)))
            assert await get_when_stored(tier, keys, entries) == entries
        finally:
            await tier.close()

    asyncio.run(main())


def test_unknown_keys_miss(make_tier):
    async def main():
        tier = make_tier()
        try:
            known = new_keys(2)
            entries = [Entry("positive", 0.75), Entry("negative", 0.25)]
            await tier.put_many(list(zip(known, entries)))
            await get_when_stored(tier, known, entries)
            assert await tier.get_many(new_keys(3)) == [None, None, None]
            assert await tier.get_many([]) == []
        finally:
            await tier.close()

    asyncio.run(main())


def test_get_many_keeps_order_and_handles_duplicates(make_tier):
    async def main():
        tier = make_tier()
        try:
            k = new_keys(4)
            entries = [Entry("a", 0.5), Entry("b", 0.25), Entry("c", 0.125)]
            await tier.put_many(list(zip(k[:3], entries)))
            await get_when_stored(tier, k[:3], entries)
            got = await tier.get_many([k[2], k[0], k[3], k[2], k[1], k[0]])
            assert got == [entries[2], entries[0], None, entries[2], entries[1], entries[0]]
        finally:
            await tier.close()

    asyncio.run(main())


def test_overwrite_replaces_the_entry(make_tier):
    async def main():
        tier = make_tier()
        try:
            (key,) = new_keys(1)
            await tier.put_many([(key, Entry("old", 0.5))])
            await get_when_stored(tier, [key], [Entry("old", 0.5)])
            await tier.put_many([(key, Entry("new", 0.25))])
            assert await get_when_stored(tier, [key], [Entry("new", 0.25)]) == [Entry("new", 0.25)]
        finally:
            await tier.close()

    asyncio.run(main())


def test_close_works_and_can_be_repeated(make_tier):
    async def main():
        tier = make_tier()
        await tier.put_many([(new_keys(1)[0], Entry("x", 1.0))])
        await tier.close()
        await tier.close()

    asyncio.run(main())


# -- L1 -----------------------------------------------------------------------


def test_memory_tier_evicts_least_recently_used():
    l1 = MemoryTier(max_entries=3)
    a, b, c, d = new_keys(4)
    for key in (a, b, c):
        l1.put(key, Entry("x", 0.5))
    assert l1.get(a) is not None  # a is now the most recently used
    l1.put(d, Entry("y", 0.5))
    assert len(l1) == 3
    assert l1.get(b) is None  # the least recently used went
    assert all(l1.get(k) is not None for k in (a, c, d))


def test_memory_tier_rejects_a_bad_size():
    with pytest.raises(ValueError, match="got 0"):
        MemoryTier(0)


def test_key_filter_knows_what_was_added():
    kf = KeyFilter(capacity=1000, error_rate=0.001)
    added = new_keys(500)
    for key in added:
        kf.add(key)
    assert all(kf.might_contain(k) for k in added)
    others = new_keys(20_000)
    false_positives = sum(kf.might_contain(k) for k in others)
    assert false_positives / len(others) < 0.005  # asked for 0.001; generous for noise


def fill_generation(kf: KeyFilter) -> list[bytes]:
    """Add keys until the filter starts a new generation. Usually exactly
    `capacity` keys; a key that is already a (false) positive is not counted."""
    start = kf.generations
    added = []
    while kf.generations == start:
        (k,) = new_keys(1)
        kf.add(k)
        added.append(k)
    assert kf.capacity <= len(added) <= kf.capacity + 5
    return added


def test_key_filter_rotates_generations_with_fixed_memory():
    kf = KeyFilter(capacity=100)
    first = fill_generation(kf)
    assert kf.generations == 2  # the first generation filled up and became "previous"
    assert all(kf.might_contain(k) for k in first)  # still consulted
    second = fill_generation(kf)
    assert kf.generations == 3
    assert all(kf.might_contain(k) for k in second)
    # The generation before the previous one was dropped: its keys are now
    # (almost all) false negatives, which only costs a skipped L2 read.
    assert sum(kf.might_contain(k) for k in first) < 10
    assert len(kf) <= 2 * kf.capacity


def test_key_filter_rejects_bad_settings():
    with pytest.raises(ValueError, match="got 0"):
        KeyFilter(0)
    with pytest.raises(ValueError, match="got 1.5"):
        KeyFilter(10, error_rate=1.5)
