"""L3: Redis, shared by every gateway host. Optional, and allowed to fail.

redis-py's defaults retry with backoff for seconds (a frozen Redis cost 58 s
per call here), which would turn a cache into an outage. So: short socket and
connect timeouts, no retries, asyncio.wait_for as a backstop over the whole
call, and a circuit breaker, so that a dead or frozen Redis costs at most
`timeout_s` for a few calls and then nothing, and traffic goes on without it.

A healthy Redis must not look dead under a burst either. redis-py's pool is
bounded (100 by default) and raises MaxConnectionsError beyond it, which the
breaker would count as Redis failing. So the pool is sized and blocking, at
most `max_concurrent` round trips are out at once, and lookups that arrive
while those are out are coalesced: they wait (briefly) and go together in
one MGET. A burst of thousands of lookups costs a few round trips.

Values are opaque bytes here: cache.entry.ValueCodec makes and checks them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from cache.breaker import BreakerState, CircuitBreaker
from protos.logs import Trouble

__all__ = ["RedisConfig", "RedisTier"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str
    ttl_s: int = 86400
    timeout_s: float = 0.1  # per call, connect included; also the longest wait for a pooled connection
    key_prefix: bytes = b"tg:"
    breaker_threshold: int = 3
    breaker_cooldown_s: float = 2.0
    # Background L3 writes pending in the tiered cache beyond this are dropped.
    max_pending_writes: int = 1000
    max_connections: int = 16  # the pool's bound, per gateway process
    max_concurrent: int = 16  # round trips out at once; lookups beyond wait and share one MGET
    max_batch_keys: int = 4096  # keys per coalesced MGET

    def __post_init__(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"L3 url must start with redis://, rediss:// or unix://, got {self.url!r}")
        if not isinstance(self.ttl_s, int) or self.ttl_s < 1:
            raise ValueError(f"L3 ttl_s must be a whole number of seconds >= 1, got {self.ttl_s!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"L3 timeout_s must be > 0, got {self.timeout_s}")
        if not isinstance(self.key_prefix, bytes):
            raise ValueError(f"L3 key_prefix must be bytes, got {self.key_prefix!r}")
        if self.breaker_threshold < 1:
            raise ValueError(f"L3 breaker_threshold must be >= 1, got {self.breaker_threshold}")
        if not self.breaker_cooldown_s > 0:
            raise ValueError(f"L3 breaker_cooldown_s must be > 0, got {self.breaker_cooldown_s}")
        if self.max_pending_writes < 1:
            raise ValueError(f"L3 max_pending_writes must be >= 1, got {self.max_pending_writes}")
        if self.max_connections < 1:
            raise ValueError(f"L3 max_connections must be >= 1, got {self.max_connections}")
        # Each round trip holds one connection: more at once would wait in the pool.
        if not 1 <= self.max_concurrent <= self.max_connections:
            raise ValueError(
                f"L3 max_concurrent must be in 1..max_connections ({self.max_connections}), got {self.max_concurrent}"
            )
        if self.max_batch_keys < 1:
            raise ValueError(f"L3 max_batch_keys must be >= 1, got {self.max_batch_keys}")


# What a broken or slow Redis raises: the client's errors, socket errors, and
# our own backstop timeout (asyncio.TimeoutError is TimeoutError from 3.11 on).
# What a failing Redis raises; filled in by the first RedisTier, which imports
# redis-py (~20 MB of modules a gateway or batch job without L3 never needs).
_FAILURES: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)
_CONNECTION_FAILURES: tuple[type[BaseException], ...] = (OSError,)


def _import_redis():
    global _FAILURES, _CONNECTION_FAILURES
    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError

    _FAILURES = (RedisError, OSError, asyncio.TimeoutError)
    _CONNECTION_FAILURES = (RedisConnectionError, OSError)
    return aioredis

# A lookup waiting for its MGET: the prefixed keys, and where its values go.
_Waiter = tuple[list[bytes], "asyncio.Future[list[bytes | None]]"]


class RedisTier:
    """The L3 tier. Create, use and close it on one event loop: the client's
    connections belong to the loop they were opened on.

    Never raises on a lookup, a write or a forget: Redis down, frozen or
    refused by the breaker is a miss, or a write not made, and counted.
    counters["hits"] counts values found, before any check of their content.
    """

    name = "l3"

    def __init__(self, config: RedisConfig, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.config = config
        self.breaker = CircuitBreaker(config.breaker_threshold, config.breaker_cooldown_s, clock,
                                      on_change=self._breaker_changed)
        self._trouble = Trouble(log, "L3 Redis", clock=clock)  # logs when errors start, go on, and end
        self.wall_clock = wall_clock  # expiry times are unix seconds, shared between hosts
        self.counters: dict[str, int] = dict.fromkeys(
            ("hits", "misses", "errors", "skipped_open", "writes", "forgotten", "round_trips"), 0
        )
        self._closed = False
        self._slots = asyncio.Semaphore(config.max_concurrent)
        self._waiting: deque[_Waiter] = deque()
        self._collector: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        aioredis = _import_redis()
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        pool = aioredis.BlockingConnectionPool.from_url(
            config.url,
            max_connections=config.max_connections,
            timeout=config.timeout_s,  # a burst waits this long for a connection, then fails
            socket_timeout=config.timeout_s,
            socket_connect_timeout=config.timeout_s,
            # No retries at all: a retry doubles the cost of every failing call,
            # and the breaker is what decides when to try again.
            retry=Retry(NoBackoff(), 0),
            retry_on_error=[],
            health_check_interval=0,  # a health check is one more round trip that can hang
            decode_responses=False,
        )
        self._client = aioredis.Redis.from_pool(pool)  # closing the client closes the pool

    # -- lookups --------------------------------------------------------------

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The stored value bytes of each key, None on a miss, an error or an
        open breaker. The bytes are untrusted: decode them with ValueCodec,
        and forget() the keys whose values fail."""
        n = len(keys)
        if n == 0:
            return []
        if self._closed or self.breaker.refusing():
            self.counters["skipped_open"] += 1
            self.counters["misses"] += n
            return [None] * n
        prefix = self.config.key_prefix
        future: asyncio.Future[list[bytes | None]] = asyncio.get_running_loop().create_future()
        self._waiting.append(([prefix + k for k in keys], future))
        if self._collector is None:
            self._collector = self._spawn(self._collect())
        # The round trip belongs to no caller: a caller that is cancelled
        # cancels only its own future, and the others that share it go on.
        values = await future
        hits = n - values.count(None)
        self.counters["hits"] += hits
        self.counters["misses"] += n - hits
        return values

    async def _collect(self) -> None:
        """Send what is waiting, one MGET per free slot: whatever arrives while
        all slots are out waits here and goes together in the next one."""
        waiting, limit = self._waiting, self.config.max_batch_keys
        try:
            while waiting and not self._closed:
                await self._slots.acquire()
                batch: list[_Waiter] = []
                count = 0
                while waiting and (not batch or count + len(waiting[0][0]) <= limit):
                    batch.append(waiting.popleft())
                    count += len(batch[-1][0])
                if not batch:  # close() emptied it meanwhile
                    self._slots.release()
                    break
                self._spawn(self._round_trip(batch))
        finally:
            self._collector = None

    async def _round_trip(self, batch: list[_Waiter]) -> None:
        try:
            values: list[bytes | None] | None = None
            if self.breaker.allow():  # one call to the breaker per call to Redis
                keys = [k for waiter_keys, _ in batch for k in waiter_keys]
                self.counters["round_trips"] += 1
                try:
                    values = await asyncio.wait_for(self._client.mget(keys), self.config.timeout_s)
                except _FAILURES as exc:
                    await self._failed(exc)
                else:
                    self._succeeded()
                    if len(values) != len(keys):  # a protocol bug or a proxy: misses, not a mismatch
                        values = None
            else:
                self.counters["skipped_open"] += len(batch)
            start = 0
            for waiter_keys, future in batch:
                end = start + len(waiter_keys)
                if not future.done():
                    future.set_result(values[start:end] if values is not None else [None] * len(waiter_keys))
                start = end
        finally:
            self._slots.release()
            for waiter_keys, future in batch:  # anything unforeseen above: nobody may hang on it
                if not future.done():
                    future.set_result([None] * len(waiter_keys))

    # -- writes ---------------------------------------------------------------

    async def put_many(self, items: Sequence[tuple[bytes, bytes, float]]) -> None:
        """Store (key, value bytes, expires_at unix seconds), each with a TTL of
        min(ttl_s, what is left of its lifetime); already expired ones are skipped."""
        if not items or self._closed:
            return
        now = self.wall_clock()
        cap_ms = self.config.ttl_s * 1000
        prefix = self.config.key_prefix
        todo = []
        for key, value, expires_at in items:
            left_ms = (expires_at - now) * 1000
            if left_ms > 0:  # NaN is not: skipped
                todo.append((prefix + key, value, cap_ms if left_ms >= cap_ms else math.ceil(left_ms)))
        if todo and await self._call(lambda: self._set_all(todo)):
            self.counters["writes"] += len(todo)

    async def _set_all(self, todo: list[tuple[bytes, bytes, int]]) -> None:
        # One round trip for the whole batch; no MULTI: entries are independent.
        async with self._client.pipeline(transaction=False) as pipe:
            for key, value, ttl_ms in todo:
                pipe.set(key, value, px=ttl_ms)
            await pipe.execute()

    async def forget(self, keys: Sequence[bytes]) -> None:
        """Delete these keys (values that failed validation). Best effort."""
        if not keys or self._closed:
            return
        prefixed = [self.config.key_prefix + k for k in keys]
        if await self._call(lambda: self._client.delete(*prefixed)):
            self.counters["forgotten"] += len(keys)

    async def _call(self, request: Callable[[], Awaitable[object]]) -> bool:
        """One round trip through the breaker and a concurrency slot; whether it worked."""
        if self.breaker.refusing():
            self.counters["skipped_open"] += 1
            return False
        async with self._slots:
            if not self.breaker.allow():
                self.counters["skipped_open"] += 1
                return False
            self.counters["round_trips"] += 1
            try:
                await asyncio.wait_for(request(), self.config.timeout_s)
            except _FAILURES as exc:
                await self._failed(exc)
                return False
        self._succeeded()
        return True

    # -- failures and closing -------------------------------------------------

    def _spawn(self, coro) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)
        return task

    def _succeeded(self) -> None:
        self.breaker.record_success()
        if self._trouble.failing:
            self._trouble.ok("calls")

    def _breaker_changed(self, old: BreakerState, new: BreakerState) -> None:
        if new is BreakerState.OPEN and old is BreakerState.CLOSED:
            log.warning("L3 Redis: breaker open after %d failed calls in a row: L3 is skipped (misses go on to the "
                        "model), and probed every %.0f s", self.breaker.failure_threshold, self.breaker.cooldown_s)
        elif new is BreakerState.CLOSED:
            log.warning("L3 Redis: breaker closed: a probe succeeded, L3 is used again")

    async def _failed(self, exc: BaseException) -> None:
        self.counters["errors"] += 1
        self._trouble.failed("calls", exc)
        self.breaker.record_failure()
        if isinstance(exc, _CONNECTION_FAILURES):
            # The pool's idle connections were most likely cut by the same
            # event (Redis restarted or gone): drop them, so the probe after the
            # cooldown opens a fresh connection instead of finding a dead one.
            try:
                await self._client.connection_pool.disconnect(inuse_connections=False)
            except _FAILURES:
                pass

    async def close(self) -> None:
        """Lookups still waiting miss; round trips out finish (within
        timeout_s each); the connections close. Repeatable."""
        if self._closed:
            return
        self._closed = True
        for waiter_keys, future in self._waiting:
            if not future.done():
                future.set_result([None] * len(waiter_keys))
        self._waiting.clear()
        if self._collector is not None:
            self._collector.cancel()  # it holds no lookup while it waits for a slot
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self._client.aclose()
        except _FAILURES as exc:
            log.debug("L3 close: %r", exc)
