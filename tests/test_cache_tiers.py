"""The CacheTier contract, run against every tier that stores value bytes (L2
on real LMDB, L3 on a real redis-server), plus the KeyFilter and its sizing
from the L2 budget. (L1 holds answers, not bytes: tested with the tiered cache.)"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Callable, Sequence

import pytest

from cache.l1 import KeyFilter
from cache.l2_lmdb import LmdbConfig, LmdbTier, filter_capacity_for
from cache.l3_redis import RedisConfig, RedisTier
from cache.tier import CacheTier
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401

MiB = 1 << 20
FAR = 4_000_000_000.0  # an expires_at beyond any TTL used here


def new_keys(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


async def get_when_stored(tier: CacheTier, keys: Sequence[bytes], expected: Sequence[bytes | None],
                          timeout: float = 5.0) -> list[bytes | None]:  # fmt: skip
    """Poll until the tier answers `expected`: put_many may queue (L2 does)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await tier.get_many(keys)
        if got == list(expected) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.005)


@pytest.fixture(params=["l2", "l3"])
def make_tier(request: pytest.FixtureRequest, tmp_path) -> Callable[[], CacheTier]:
    """A factory, called inside the test's event loop (Redis connections
    belong to the loop that opens them)."""
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
            assert tier.name in ("l2", "l3")
        finally:
            await tier.close()

    asyncio.run(main())


def test_put_then_get_returns_the_values(make_tier):
    async def main():
        tier = make_tier()
        try:
            keys = new_keys(5)
            values = [os.urandom(i * 20) for i in range(5)]  # opaque bytes, the empty value too
            await tier.put_many([(k, v, FAR) for k, v in zip(keys, values)])
            assert await get_when_stored(tier, keys, values) == values
        finally:
            await tier.close()

    asyncio.run(main())


def test_unknown_keys_miss(make_tier):
    async def main():
        tier = make_tier()
        try:
            known = new_keys(2)
            values = [b"positive", b"negative"]
            await tier.put_many([(k, v, FAR) for k, v in zip(known, values)])
            await get_when_stored(tier, known, values)
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
            values = [b"a", b"b", b"c"]
            await tier.put_many([(key, v, FAR) for key, v in zip(k[:3], values)])
            await get_when_stored(tier, k[:3], values)
            got = await tier.get_many([k[2], k[0], k[3], k[2], k[1], k[0]])
            assert got == [values[2], values[0], None, values[2], values[1], values[0]]
        finally:
            await tier.close()

    asyncio.run(main())


def test_overwrite_replaces_the_entry(make_tier):
    async def main():
        tier = make_tier()
        try:
            (key,) = new_keys(1)
            await tier.put_many([(key, b"old", FAR)])
            await get_when_stored(tier, [key], [b"old"])
            await tier.put_many([(key, b"new", FAR)])
            assert await get_when_stored(tier, [key], [b"new"]) == [b"new"]
        finally:
            await tier.close()

    asyncio.run(main())


def test_forget_deletes_and_expired_items_are_not_stored(make_tier):
    async def main():
        tier = make_tier()
        try:
            keep, drop, expired = new_keys(3)
            await tier.put_many([(keep, b"keep", FAR), (drop, b"drop", FAR), (expired, b"old", time.time() - 1)])
            await get_when_stored(tier, [keep, drop], [b"keep", b"drop"])
            await tier.forget([drop])
            assert await get_when_stored(tier, [keep, drop, expired], [b"keep", None, None]) == [b"keep", None, None]
        finally:
            await tier.close()

    asyncio.run(main())


def test_close_works_and_can_be_repeated(make_tier):
    async def main():
        tier = make_tier()
        await tier.put_many([(new_keys(1)[0], b"x", FAR)])
        await tier.close()
        await tier.close()

    asyncio.run(main())


# -- the KeyFilter --------------------------------------------------------------


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


# -- the KeyFilter is sized from the L2 budget (issue 9 item 10) -------------------


def fill_to_the_budget(tier: LmdbTier, value: bytes) -> int:
    """Write until the budget is reached (eviction begins); return the most
    entries L2 held: the densest it gets."""
    peak = 0
    while tier.counters["evicted"] == 0:
        tier.put_many_nowait([(k, value, FAR) for k in new_keys(2000)])
        assert tier.flush(30)
        peak = max(peak, len(tier))
    return peak


def test_filter_capacity_covers_every_entry_the_default_l2_budget_can_hold(tmp_path):
    # Measure how densely L2 packs the smallest real values (a 1-byte label),
    # at a small budget, and scale to the default budget: the filter sized
    # for the default must hold at least that many keys in one generation.
    # (A fixed 1M per generation, as before, remembered about a third.)
    small = LmdbConfig(tmp_path, max_bytes=4 * MiB, map_size=64 * MiB, sync_interval_s=0.05)
    tier = LmdbTier(small)
    try:
        peak = fill_to_the_budget(tier, b"\x01" * 27)  # as long as a ValueCodec value of a 1-byte label
    finally:
        tier.close_sync()
    assert filter_capacity_for(small) >= peak
    default = LmdbConfig(tmp_path)
    assert default.max_bytes == 512 * MiB
    assert filter_capacity_for(default) >= peak * (default.max_bytes / small.max_bytes)


def test_a_filter_warmed_from_a_full_l2_skips_none_of_it(tmp_path):
    config = LmdbConfig(tmp_path, max_bytes=2 * MiB, map_size=64 * MiB, sync_interval_s=0.05)
    tier = LmdbTier(config)
    try:
        fill_to_the_budget(tier, b"\x01" * 27)
        for _ in range(3):  # and on into the plateau, with eviction at work
            tier.put_many_nowait([(k, b"\x01" * 27, FAR) for k in new_keys(5000)])
            assert tier.flush(30)
        held = list(tier.iter_keys())
    finally:
        tier.close_sync()
    kf = KeyFilter(filter_capacity_for(config), error_rate=0.0005)
    for key in held:  # what a gateway does at start
        kf.add(key)
    assert kf.generations == 1  # all of it fits in one generation: the previous one stays free for later writes
    assert sum(not kf.might_contain(k) for k in held) == 0


def test_filter_capacity_flag_and_its_default_from_the_l2_budget(tmp_path):
    from gateway.cli import build_parser, gateway_config

    def config_of(*flags: str):
        args = build_parser().parse_args(["gateway", "--lmdb-path", str(tmp_path), *flags])
        return gateway_config(args, ["127.0.0.1:1"])

    default = config_of()
    assert default.filter_capacity is None  # sized when the gateway starts, from its L2 budget
    assert filter_capacity_for(default.lmdb) == filter_capacity_for(LmdbConfig(tmp_path))
    assert filter_capacity_for(config_of("--l2-max-mb", "64").lmdb) * 8 == pytest.approx(
        filter_capacity_for(default.lmdb), rel=1e-5
    )
    assert config_of("--filter-capacity", "5000000").filter_capacity == 5_000_000
