"""What every tier stores: a label and its score, and where an answer came from."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = ["Entry", "Source", "encode_entry", "decode_entry"]


class Source(enum.IntEnum):
    """Where an answer came from. Values equal the public proto's `Tier` enum."""

    L1 = 1
    L2 = 2
    L3 = 3
    MODEL = 4


@dataclass(frozen=True, slots=True)
class Entry:
    label: str
    score: float


# float32 score, then the UTF-8 label. Compact, and no raw text is ever stored.
_SCORE = struct.Struct("<f")


def encode_entry(entry: Entry) -> bytes:
    return _SCORE.pack(entry.score) + entry.label.encode("utf-8")


def decode_entry(data: bytes) -> Entry:
    """Inverse of encode_entry. Raises ValueError on bytes it did not write."""
    if len(data) < _SCORE.size + 1:
        raise ValueError(f"cache entry of {len(data)} bytes is too short")
    (score,) = _SCORE.unpack_from(data)
    return Entry(label=bytes(data[_SCORE.size :]).decode("utf-8"), score=score)
