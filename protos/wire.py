"""Reading the texts out of ClassifyRequest / ClassifyBatchRequest bytes
without the protobuf runtime.

Both messages have one field, `1: string` (repeated in the batch), and every
client encodes a message as that field's records one after another. Reading
those records straight from the bytes lets the hit path hash a text without
parsing or decoding it, and lets an invalid text be named by its index
(protobuf's own parser only says that *some* string was not UTF-8).
"""

from __future__ import annotations

__all__ = ["field1_values", "frame_field1", "varint"]


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def frame_field1(payload: bytes) -> bytes:
    """`payload` as one record of field 1 (length-delimited)."""
    return b"\x0a" + varint(len(payload)) + payload


def field1_values(data: bytes) -> list[bytes] | None:
    """The payloads of every field-1 record in `data`, in order; None if
    `data` holds anything else (then let protobuf parse it)."""
    out = []
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] != 0x0A:
            return None
        pos += 1
        length = shift = 0
        while True:
            if pos >= end or shift > 28:
                return None
            b = data[pos]
            pos += 1
            length |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
        if pos + length > end:
            return None
        out.append(data[pos : pos + length])
        pos += length
    return out
