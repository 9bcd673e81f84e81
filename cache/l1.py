"""L1: per-process RAM. A bounded LRU of recent answers, and a Bloom filter of
the keys held in L2 so that a miss can skip the L2 read."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from pybloom_live import BloomFilter

from cache.entry import Entry

__all__ = ["MemoryTier", "KeyFilter"]


class MemoryTier:
    """A bounded LRU of entries: the hit path of the whole gateway.

    The sync get/put are what the hot path uses (no coroutine, no await); the
    async methods exist so L1 also satisfies the CacheTier contract. Not
    thread-safe: it belongs to one event loop.
    """

    name = "l1"

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"L1 max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        # Values are plain (label, score) tuples, not Entry objects: the
        # garbage collector stops tracking such a tuple after its first pass,
        # whereas every full collection walked each Entry (with 100,000 held:
        # 5 ms instead of 10 per collection, a stall of every call in the process).
        self._data: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    def get(self, key: bytes) -> Entry | None:
        found = self._data.get(key)
        if found is None:
            return None
        self._data.move_to_end(key)
        return Entry(*found)

    def put(self, key: bytes, entry: Entry) -> None:
        data = self._data
        data[key] = (entry.label, entry.score)
        data.move_to_end(key)
        if len(data) > self.max_entries:
            data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        # Membership without touching recency (tests, introspection).
        return key in self._data

    async def get_many(self, keys: Sequence[bytes]) -> list[Entry | None]:
        get = self.get
        return [get(k) for k in keys]

    async def put_many(self, items: Sequence[tuple[bytes, Entry]]) -> None:
        put = self.put
        for key, entry in items:
            put(key, entry)

    async def close(self) -> None:
        self._data.clear()


def _bloom_key(key: bytes) -> str:
    # pybloom-live hashes str(key).encode() for anything that is not a str,
    # i.e. the repr "b'...'" of bytes: wasteful, and a BytesWarning under -b.
    # latin-1 maps each byte to one code point, so this is lossless and cheap.
    return key.decode("latin-1")


class KeyFilter:
    """A Bloom filter of the keys held in L2, rotated by generation.

    A Bloom filter cannot delete, and pybloom-live's ScalableBloomFilter grows
    without bound while its false-positive rate drifts above the one asked for.
    So two fixed-size filters are kept: `add` goes to the current one; when it
    has taken `capacity` keys the previous generation is dropped, the current
    one becomes the previous, and a fresh one starts. Memory stays fixed.

    might_contain() is "in current or in previous". Each generation is built
    for error_rate/2, so the two together stay within `error_rate` false
    positives (a false positive costs one L2 read that misses).

    Keys that live only in a dropped generation become false negatives: L2 is
    skipped for them although it may still hold them. That costs an L3 read or
    a model call, never a wrong answer, and the next write of the key puts it
    back. Size `capacity` near the number of entries L2 holds to keep those
    rare. Not thread-safe: it belongs to one event loop.
    """

    __slots__ = ("capacity", "error_rate", "generations", "_current", "_previous")

    def __init__(self, capacity: int, error_rate: float = 0.001) -> None:
        if capacity < 1:
            raise ValueError(f"KeyFilter capacity must be >= 1, got {capacity}")
        if not 0.0 < error_rate < 1.0:
            raise ValueError(f"KeyFilter error_rate must be in (0, 1), got {error_rate}")
        self.capacity = capacity
        self.error_rate = error_rate
        self.generations = 1  # how many generations were started, for stats
        self._current = self._new()
        self._previous: BloomFilter | None = None

    def _new(self) -> BloomFilter:
        return BloomFilter(capacity=self.capacity, error_rate=self.error_rate / 2)

    def add(self, key: bytes) -> None:
        current = self._current
        current.add(_bloom_key(key))  # counts only keys it did not hold yet
        if current.count >= self.capacity:
            self._previous = current
            self._current = self._new()
            self.generations += 1

    def might_contain(self, key: bytes) -> bool:
        k = _bloom_key(key)
        if k in self._current:
            return True
        previous = self._previous
        return previous is not None and k in previous

    __contains__ = might_contain

    def __len__(self) -> int:
        """Approximate number of keys remembered (both generations)."""
        return self._current.count + (self._previous.count if self._previous is not None else 0)
