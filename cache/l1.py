"""The Bloom filter of the keys held in L2, so that a miss can skip the L2 read
(L1's answers themselves live in cache.l1_memory)."""

from __future__ import annotations

from pybloom_live import BloomFilter

__all__ = ["KeyFilter"]


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
    back. So `capacity` must be at least the number of entries L2 can hold:
    cache.l2_lmdb.filter_capacity_for(config) derives it from L2's budget,
    and then a filter warmed from a full L2 holds all of it in its current
    generation. Not thread-safe: it belongs to one event loop.
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
