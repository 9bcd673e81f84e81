"""Serialized L1 answers, so a repeat lookup costs one hash and one dict get.

Repeat lookups (the same texts again and again) are most of the traffic, and
on that path the per-call Python work is what limits throughput: parsing the
request, normalizing the text, the tiered lookup, building and serializing the
response. The memo skips all of it: it maps a hash of a Classify request's
exact bytes (the unary encoding of one text) to the serialized response that
L1 would produce for it.

It is part of L1: an entry goes in only while L1 holds that text's answer for
the current model, it is bounded like L1, and it is keyed by a 128-bit hash
(never the raw text). A new model fingerprint empties it.
"""

from __future__ import annotations

import hashlib

from protos import classifier_pb2

__all__ = ["ResponseMemo", "unary_request_bytes"]

_TIER_L1 = classifier_pb2.TIER_L1


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def unary_request_bytes(text_utf8: bytes) -> bytes:
    """What a ClassifyRequest carrying this text serializes to (field 1, length-delimited)."""
    return b"\x0a" + _varint(len(text_utf8)) + text_utf8


class ResponseMemo:
    __slots__ = ("capacity", "model", "_seed", "_responses", "hits")  # hits: counted by the callers

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"memo capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.model = None  # the RemoteModel whose answers these are
        self._seed = hashlib.blake2b(digest_size=16)
        # hash -> (ClassifyResponse bytes, the same framed as one ClassifyBatchResponse.results element)
        self._responses: dict[bytes, tuple[bytes, bytes]] = {}
        self.hits = 0

    def __len__(self) -> int:
        return len(self._responses)

    def use_model(self, model) -> None:
        """Empties the memo unless `model` is the one its answers came from."""
        if model is not self.model:
            self.model = model
            self._responses = {}
            self._seed = hashlib.blake2b(model.fingerprint.encode() + b"\x00", digest_size=16) if model else None

    def _key(self, request_bytes: bytes) -> bytes:
        h = self._seed.copy()
        h.update(request_bytes)
        return h.digest()

    def get(self, request_bytes: bytes) -> tuple[bytes, bytes] | None:
        """(response bytes, framed response bytes) for a unary request's exact bytes."""
        return self._responses.get(self._key(request_bytes))

    def put(self, request_bytes: bytes, label: str, score: float) -> None:
        responses = self._responses
        if len(responses) >= self.capacity:
            del responses[next(iter(responses))]  # oldest first: dicts keep insertion order
        response = classifier_pb2.ClassifyResponse(
            label=label, score=score, tier=_TIER_L1, model=self.model.display
        ).SerializeToString()
        responses[self._key(request_bytes)] = (response, b"\x0a" + _varint(len(response)) + response)
