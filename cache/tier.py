"""The one small interface every cache tier implements."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from cache.entry import Entry

__all__ = ["CacheTier"]


@runtime_checkable
class CacheTier(Protocol):
    """A store of Entry values under fixed-size keys (cache.keys.KEY_SIZE bytes).

    get_many answers one slot per key, None for a miss (absent, expired, or the
    tier unreachable: a cache tier never raises on a lookup, it misses).
    put_many stores entries; it may queue them and return before they land, and
    it never raises because a tier is down. close releases the tier's resources.
    """

    name: str

    async def get_many(self, keys: Sequence[bytes]) -> list[Entry | None]: ...

    async def put_many(self, items: Sequence[tuple[bytes, Entry]]) -> None: ...

    async def close(self) -> None: ...
