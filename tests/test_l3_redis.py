"""L3 on a real redis-server: TTLs and remaining lifetimes, forgetting, bursts
that a healthy Redis must absorb, and what a dead, frozen or restarted Redis
costs (the promise: a few ms per request at most once the breaker is open)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import redis

from cache.breaker import BreakerState, CircuitBreaker
from cache.l3_redis import RedisConfig, RedisTier
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401

FAR = 4_000_000_000.0  # an expires_at beyond any TTL used here

# Per call once the breaker is open. The real cost is microseconds; the bound
# is loose for a noisy 2-core machine, and still far below any RPC deadline.
OPEN_CALL_BOUND_S = 0.05


def keys(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def sync_client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=5)


async def timed(coro) -> tuple[object, float]:
    start = time.perf_counter()
    result = await coro
    return result, time.perf_counter() - start


async def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(interval)
    return False


# -- config and breaker -----------------------------------------------------------


def test_config_validates_with_the_bad_value_in_the_message():
    with pytest.raises(ValueError, match="got 'localhost:6379'"):
        RedisConfig("localhost:6379")
    with pytest.raises(ValueError, match="got 0"):
        RedisConfig("redis://x", ttl_s=0)
    with pytest.raises(ValueError, match="got -1"):
        RedisConfig("redis://x", timeout_s=-1)
    with pytest.raises(ValueError, match="got 'tg:'"):
        RedisConfig("redis://x", key_prefix="tg:")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_concurrent must be in 1..max_connections \(4\), got 8"):
        RedisConfig("redis://x", max_connections=4, max_concurrent=8)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_probes_once():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=3, cooldown_s=2.0, clock=clock)
    assert b.state is BreakerState.CLOSED
    b.record_failure()
    b.record_failure()
    b.record_success()  # not consecutive any more
    b.record_failure()
    b.record_failure()
    assert b.allow() and b.state is BreakerState.CLOSED
    b.record_failure()
    assert b.state is BreakerState.OPEN
    assert not b.allow()
    clock.now += 1.9
    assert not b.allow()
    clock.now += 0.2
    assert b.allow()  # the one probe
    assert b.state is BreakerState.HALF_OPEN
    assert not b.allow()  # nobody else while it is out
    b.record_failure()  # the probe failed: open for another cooldown
    assert b.state is BreakerState.OPEN and not b.allow()
    clock.now += 2.0
    assert b.allow()
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.allow()


def test_breaker_ignores_late_successes_and_recovers_from_a_lost_probe():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=1, cooldown_s=1.0, clock=clock)
    b.record_failure()
    b.record_success()  # from a call that started before it opened
    assert b.state is BreakerState.OPEN
    clock.now += 1.0
    assert b.allow()  # a probe goes out, and its caller is cancelled: no report
    clock.now += 0.5
    assert not b.allow()
    clock.now += 0.5
    assert b.allow()  # not stuck half-open forever


def test_breaker_refusing_changes_nothing():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=1, cooldown_s=1.0, clock=clock)
    assert not b.refusing()
    b.record_failure()
    assert b.refusing() and b.state is BreakerState.OPEN
    clock.now += 1.0
    assert not b.refusing() and b.state is BreakerState.OPEN  # no probe was let out by asking
    assert b.allow() and b.state is BreakerState.HALF_OPEN
    assert b.refusing() and not b.allow()


def test_breaker_validates_settings():
    with pytest.raises(ValueError, match="got 0"):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError, match="got -1"):
        CircuitBreaker(cooldown_s=-1)


# -- against a real Redis ------------------------------------------------------


def test_entries_carry_the_ttl_or_what_is_left_of_their_lifetime(redis_server):
    async def main():
        now = 1_700_000_000.0
        tier = RedisTier(RedisConfig(redis_server.url, ttl_s=300, timeout_s=2.0, key_prefix=b"t:"),
                         wall_clock=lambda: now)  # fmt: skip
        try:
            full, short, gone = keys(3), keys(2), keys(2)
            await tier.put_many([(k, b"full", now + 10_000) for k in full]
                                + [(k, b"short", now + 30.5) for k in short]  # promoted with 30.5 s left
                                + [(k, b"gone", now - 1) for k in gone])  # fmt: skip
            assert tier.counters["writes"] == 5
            return full, short, gone
        finally:
            await tier.close()

    full, short, gone = asyncio.run(main())
    client = sync_client(redis_server)
    try:
        for k in full:
            assert 299_000 <= client.pttl(b"t:" + k) <= 300_000
        for k in short:
            assert 29_000 <= client.pttl(b"t:" + k) <= 30_500
        assert client.dbsize() == 5  # the prefix is used, nothing else is written; expired ones are skipped
    finally:
        client.close()


def test_forget_deletes_keys(redis_server):
    async def main():
        tier = RedisTier(RedisConfig(redis_server.url, timeout_s=2.0))
        try:
            ks = keys(3)
            await tier.put_many([(k, b"v", FAR) for k in ks])
            await tier.forget(ks[:2])
            assert await tier.get_many(ks) == [None, None, b"v"]
            assert tier.counters["forgotten"] == 2
        finally:
            await tier.close()

    asyncio.run(main())


def test_a_burst_on_a_healthy_redis_is_coalesced_not_a_failure(redis_server):
    # Issue 9 item 9: 2000 lookups of new texts at once used to need 2000
    # connections; past redis-py's pool bound they raised MaxConnectionsError
    # and opened the breaker while Redis was fine.
    async def main():
        tier = RedisTier(RedisConfig(redis_server.url, timeout_s=1.0, max_connections=4, max_concurrent=4))
        try:
            stored = keys(50)
            await tier.put_many([(k, k, FAR) for k in stored])
            asks = [[os.urandom(16)] for _ in range(2000)] + [[k] for k in stored]
            got = await asyncio.gather(*(tier.get_many(ks) for ks in asks))
            assert got == [[None]] * 2000 + [[k] for k in stored]
            assert tier.breaker.state is BreakerState.CLOSED
            assert tier.counters["errors"] == 0 and tier.counters["skipped_open"] == 0
            # Coalesced: a handful of MGETs, not one per lookup.
            assert tier.counters["round_trips"] <= 1 + 8, tier.counters
            clients = sync_client(redis_server)
            try:
                assert len(clients.client_list()) <= 4 + 1  # the pool's bound, and this client
            finally:
                clients.close()
        finally:
            await tier.close()

    asyncio.run(main())


def test_a_cancelled_lookup_does_not_hurt_the_ones_sharing_its_round_trip(redis_server):
    async def main():
        tier = RedisTier(RedisConfig(redis_server.url, timeout_s=2.0, max_connections=1, max_concurrent=1))
        try:
            ks = keys(3)
            await tier.put_many([(k, k, FAR) for k in ks])
            tasks = [asyncio.ensure_future(tier.get_many([k])) for k in ks]
            await asyncio.sleep(0)
            tasks[1].cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            assert done[0] == [ks[0]] and done[2] == [ks[2]]
            assert isinstance(done[1], asyncio.CancelledError)
            assert await tier.get_many(ks) == ks
        finally:
            await tier.close()
        assert await tier.get_many(ks) == [None] * 3  # closed: misses, no error

    asyncio.run(main())


def test_killed_redis_costs_next_to_nothing(redis_server):
    async def main():
        tier = RedisTier(RedisConfig(redis_server.url, timeout_s=0.2, breaker_threshold=3, breaker_cooldown_s=30))
        try:
            ks = keys(4)
            await tier.put_many([(k, b"x", FAR) for k in ks])
            assert await tier.get_many(ks) == [b"x"] * 4
            redis_server.kill()
            # Refused connections fail fast even before the breaker opens.
            for _ in range(3):
                got, took = await timed(tier.get_many(ks))
                assert got == [None] * 4
                assert took < 0.2 + 0.1
            assert tier.breaker.state is BreakerState.OPEN
            worst = 0.0
            for _ in range(50):
                got, took = await timed(tier.get_many(ks))
                assert got == [None] * 4
                worst = max(worst, took)
                _, took = await timed(tier.put_many([(ks[0], b"y", FAR)]))
                worst = max(worst, took)
            assert worst < OPEN_CALL_BOUND_S, worst
            assert tier.counters["skipped_open"] == 100
            assert tier.counters["errors"] == 3
        finally:
            await tier.close()

    asyncio.run(main())


def test_frozen_redis_costs_one_timeout_per_call_until_the_breaker_opens(redis_server):
    async def main():
        timeout = 0.1
        tier = RedisTier(RedisConfig(redis_server.url, timeout_s=timeout, breaker_threshold=3, breaker_cooldown_s=30))
        try:
            ks = keys(2)
            await tier.put_many([(k, b"x", FAR) for k in ks])
            redis_server.pause()  # connections stay open; nothing answers
            for _ in range(3):
                got, took = await timed(tier.get_many(ks))
                assert got == [None, None]
                assert took < timeout + 0.25  # bounded by timeout_s, not by redis-py's retries
            assert tier.breaker.state is BreakerState.OPEN
            worst = 0.0
            for _ in range(20):
                _, took = await timed(tier.get_many(ks))
                worst = max(worst, took)
            assert worst < OPEN_CALL_BOUND_S, worst
        finally:
            redis_server.resume()
            await tier.close()

    asyncio.run(main())


def test_restarted_redis_works_again_after_the_cooldown(redis_server, caplog):
    caplog.set_level("WARNING", logger="cache.l3_redis")

    async def main():
        tier = RedisTier(RedisConfig(redis_server.url, timeout_s=0.2, breaker_threshold=2, breaker_cooldown_s=0.2))
        try:
            ks = keys(2)
            await tier.put_many([(k, b"x", FAR) for k in ks])
            redis_server.kill()
            for _ in range(2):
                await tier.get_many(ks)
            assert tier.breaker.state is BreakerState.OPEN
            redis_server.start()  # same port, empty

            async def works() -> bool:
                await tier.put_many([(ks[0], b"back", FAR)])
                return await tier.get_many(ks[:1]) == [b"back"]

            assert await wait_until(works, timeout=10.0), tier.counters
            assert tier.breaker.state is BreakerState.CLOSED
        finally:
            await tier.close()

    asyncio.run(main())
    # The outage is told when it starts and when it ends, once each, whatever the number of failed calls.
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    assert lines[0].startswith("L3 Redis: calls errors started: ")
    assert lines[1].startswith("L3 Redis: breaker open after 2 failed calls in a row")
    assert lines[2] == "L3 Redis: breaker closed: a probe succeeded, L3 is used again"
    assert lines[3].startswith("L3 Redis: calls works again after ") and "errors)" in lines[3]


def test_close_with_lookups_out_and_waiting_leaves_nobody_hanging(redis_server):
    async def main():
        tier = RedisTier(RedisConfig(redis_server.url, timeout_s=0.2, max_connections=1, max_concurrent=1))
        try:
            await tier.put_many([(k, b"x", FAR) for k in keys(1)])  # a connection is open
            redis_server.pause()
            lookups = [asyncio.ensure_future(tier.get_many(keys(2))) for _ in range(5)]
            for _ in range(3):  # let one go out on the frozen connection; the others wait for the slot
                await asyncio.sleep(0)
            await tier.close()
            assert await asyncio.wait_for(asyncio.gather(*lookups), 5) == [[None, None]] * 5
        finally:
            redis_server.resume()

    asyncio.run(main())
