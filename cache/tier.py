"""The one small interface every remote cache tier (L2, L3) implements."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

__all__ = ["CacheTier"]


@runtime_checkable
class CacheTier(Protocol):
    """A store of opaque value bytes under fixed-size keys (cache.keys.KEY_SIZE
    bytes). Tiers never interpret values: cache.entry.ValueCodec makes them and
    checks every one read back, since a tier's contents are untrusted.

    get_many answers one slot per key: the stored bytes, or None for a miss
    (absent, expired, or the tier unreachable: a cache tier never raises on a
    lookup, it misses).
    put_many stores (key, value, expires_at) items, expires_at in unix
    seconds: a tier keeps an item at most until then (and at most its own
    TTL), and skips items already expired. It may queue them and return
    before they land, and it never raises because a tier is down.
    forget deletes keys whose values failed validation, best effort.
    close releases the tier's resources.
    """

    name: str

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]: ...

    async def put_many(self, items: Sequence[tuple[bytes, bytes, float]]) -> None: ...

    async def forget(self, keys: Sequence[bytes]) -> None: ...

    async def close(self) -> None: ...
