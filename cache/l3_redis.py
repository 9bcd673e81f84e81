"""L3: Redis, shared by every gateway host. Optional, and allowed to fail.

redis-py's defaults retry with backoff for seconds (a frozen Redis cost 58 s
per call here), which would turn a cache into an outage. So: short socket and
connect timeouts, no retries, asyncio.wait_for as a backstop over the whole
call, and a circuit breaker, so that a dead or frozen Redis costs at most
`timeout_s` for a few calls and then nothing, and traffic goes on without it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from cache.breaker import CircuitBreaker
from cache.entry import Entry, decode_entry, encode_entry

__all__ = ["RedisConfig", "RedisTier"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str
    ttl_s: int = 86400
    timeout_s: float = 0.1  # per call, connect included
    key_prefix: bytes = b"tg:"
    breaker_threshold: int = 3
    breaker_cooldown_s: float = 2.0
    # Background L3 writes pending in the tiered cache beyond this are dropped.
    max_pending_writes: int = 1000

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


# What a broken or slow Redis raises: the client's errors, socket errors, and
# our own backstop timeout (asyncio.TimeoutError is TimeoutError from 3.11 on).
_FAILURES = (RedisError, OSError, asyncio.TimeoutError)


class RedisTier:
    """The L3 tier. Create, use and close it on one event loop: the client's
    connections belong to the loop they were opened on."""

    name = "l3"

    def __init__(self, config: RedisConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.breaker = CircuitBreaker(config.breaker_threshold, config.breaker_cooldown_s, clock)
        self.counters: dict[str, int] = dict.fromkeys(
            ("hits", "misses", "errors", "skipped_open", "writes", "bad_values"), 0
        )
        self._logged = False
        self._client = aioredis.Redis.from_url(
            config.url,
            socket_timeout=config.timeout_s,
            socket_connect_timeout=config.timeout_s,
            # No retries at all: a retry doubles the cost of every failing call,
            # and the breaker is what decides when to try again.
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            retry_on_error=[],
            health_check_interval=0,  # a health check is one more round trip that can hang
            decode_responses=False,
        )

    async def get_many(self, keys: Sequence[bytes]) -> list[Entry | None]:
        n = len(keys)
        if n == 0:
            return []
        if not self.breaker.allow():
            self.counters["skipped_open"] += 1
            self.counters["misses"] += n
            return [None] * n
        prefix = self.config.key_prefix
        try:
            values = await asyncio.wait_for(
                self._client.mget([prefix + k for k in keys]), self.config.timeout_s
            )
        except _FAILURES as exc:
            await self._failed(exc)
            self.counters["misses"] += n
            return [None] * n
        self.breaker.record_success()
        out: list[Entry | None] = []
        for value in values:
            entry = None
            if value is not None:
                try:
                    entry = decode_entry(value)
                except ValueError:
                    # Not ours, or written by an incompatible version: a miss.
                    self.counters["bad_values"] += 1
            out.append(entry)
        hits = sum(e is not None for e in out)
        self.counters["hits"] += hits
        self.counters["misses"] += n - hits
        return out

    async def put_many(self, items: Sequence[tuple[bytes, Entry]]) -> None:
        if not items:
            return
        if not self.breaker.allow():
            self.counters["skipped_open"] += 1
            return
        prefix, ttl = self.config.key_prefix, self.config.ttl_s
        try:
            await asyncio.wait_for(self._set_all(prefix, ttl, items), self.config.timeout_s)
        except _FAILURES as exc:
            await self._failed(exc)
            return
        self.breaker.record_success()
        self.counters["writes"] += len(items)

    async def _set_all(self, prefix: bytes, ttl: int, items: Sequence[tuple[bytes, Entry]]) -> None:
        # One round trip for the whole batch; no MULTI: entries are independent.
        async with self._client.pipeline(transaction=False) as pipe:
            for key, entry in items:
                pipe.set(prefix + key, encode_entry(entry), ex=ttl)
            await pipe.execute()

    async def _failed(self, exc: BaseException) -> None:
        self.breaker.record_failure()
        self.counters["errors"] += 1
        if not self._logged:
            self._logged = True
            log.warning("L3 Redis error (logged once, then counted; the breaker skips L3 while it fails): %r", exc)
        else:
            log.debug("L3 Redis error: %r", exc)
        if isinstance(exc, (RedisConnectionError, OSError)):
            # The pool's idle connections were most likely cut by the same
            # event (Redis restarted or gone): drop them, so the probe after the
            # cooldown opens a fresh connection instead of finding a dead one.
            try:
                await self._client.connection_pool.disconnect(inuse_connections=False)
            except _FAILURES:
                pass

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except _FAILURES as exc:
            log.debug("L3 close: %r", exc)
