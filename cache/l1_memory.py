"""L1: this process's RAM, the hit path of the whole gateway.

One bounded LRU of answers for one model. Next to each answer it keeps that
answer rendered once, when it went in, as the bytes of the response a caller
gets for an L1 hit; a repeat lookup is then one hash and one dict get, with
no parsing, no normalization and no serialization. There is nothing else in
L1: one eviction policy, one model.

A new model empties it (`use_model`): entries are keyed by a hash that
includes the model fingerprint, so an old model's answers could never match,
but they would hold memory for nothing.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

from cache.entry import Entry
from cache.upstream import ModelRef
from protos.wire import frame_field1

__all__ = ["MemoryTier", "Render"]

# (entry, model) -> the bytes served for an L1 hit of that entry.
Render = Callable[[Entry, ModelRef], bytes]


class MemoryTier:
    """Not thread-safe: it belongs to one event loop."""

    name = "l1"

    def __init__(self, max_entries: int, render: Render | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        if max_entries < 1:
            raise ValueError(f"L1 max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.model: ModelRef | None = None
        self._render = render
        self._clock = clock
        # key -> (label, score, expires_at, rendered response, the same framed as
        # one element of a repeated field 1). Plain tuples of
        # atoms: the garbage collector stops tracking them after one pass, so a
        # full collection with 100,000 held stays ~5 ms instead of ~10.
        self._data: OrderedDict[bytes, tuple[str, float, float, bytes, bytes]] = OrderedDict()

    def use_model(self, model: ModelRef | None) -> None:
        """Hold answers of `model` from now on (emptied if it is another one)."""
        if model != self.model:
            self.model = model
            self._data = OrderedDict()

    def _live(self, key: bytes) -> tuple[str, float, float, bytes, bytes] | None:
        found = self._data.get(key)
        if found is None:
            return None
        if found[2] <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return found

    def response(self, key: bytes) -> bytes | None:
        """The rendered L1 response for key, or None. The hot path."""
        found = self._live(key)
        return None if found is None else found[3]

    def framed_responses(self, keys: list[bytes]) -> list[bytes] | None:
        """The rendered responses of all `keys`, each framed as one element of a
        repeated field 1 (a ClassifyBatchResponse's results), or None as soon
        as one is not held. The batch hit path: one clock read for all."""
        data = self._data
        now = self._clock()
        out = []
        for key in keys:
            found = data.get(key)
            if found is None or found[2] <= now:
                return None
            data.move_to_end(key)
            out.append(found[4])
        return out

    def get(self, key: bytes) -> Entry | None:
        found = self._live(key)
        return None if found is None else Entry(found[0], found[1], found[2])

    def put(self, key: bytes, entry: Entry, model: ModelRef) -> bool:
        """Stores an answer of `model`; only answers of the model L1 holds go in
        (returns whether it did)."""
        if model != self.model:
            return False
        rendered = self._render(entry, model) if self._render is not None else b""
        data = self._data
        data[key] = (entry.label, entry.score, entry.expires_at, rendered, frame_field1(rendered))
        data.move_to_end(key)
        if len(data) > self.max_entries:
            data.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        # Membership without touching recency (tests, introspection).
        return key in self._data

    async def close(self) -> None:
        self._data.clear()
