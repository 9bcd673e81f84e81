"""Issue 9 item 2: garbage in tiergate's Redis keys is never an answer.

Each kind of garbage the issue found served as a TIER_L3 answer is written
with a plain Redis client into the key the RedisTier reads (key_prefix +
key), read back through the RedisTier from a real redis-server, and must be
refused by the ValueCodec, with and without a secret. The label and score
kinds come twice: in the old format (what the issue wrote), and forged in the
new format with a valid checksum, which anyone can compute when no secret is
configured: then the label and score checks are what stops them.
"""

from __future__ import annotations

import asyncio
import math
import os
import struct

import pytest
import redis

from cache.entry import _HEAD, BadValue, Entry, ValueCodec
from cache.l3_redis import RedisConfig, RedisTier
from tests.support.redis_server import redis_server  # noqa: F401

LABELS = ("negative", "positive")  # a 2-label model
SECRET = b"the-cache-secret-of-this-gateway"
NOW = 1_700_000_000.0
LATER = 4_000_000_000.0


def old_format(score: float, label: bytes) -> bytes:
    # What main stored before the codec: float32 score, then the label.
    return struct.pack("<f", score) + label


def forged(key: bytes, score: float, label: bytes) -> bytes:
    """A value in the current format with a valid unkeyed checksum, as anyone
    who can read this source could write it."""
    body = _HEAD.pack(1, int(LATER), score, len(label) & 0xFF) + label
    return body + ValueCodec(LABELS)._tag(key, body)


def garbage(key: bytes, other_key: bytes) -> dict[str, bytes]:
    genuine = ValueCodec(LABELS).encode(key, Entry("positive", 0.75, LATER))
    flipped = bytearray(genuine)
    flipped[6] ^= 0x01  # inside the score
    out: dict[str, bytes] = {}
    for name, score, label in [
        ("age!-1.1e21", 1.1e21, b"age!"),
        ("nan", math.nan, b"positive"),
        ("inf", math.inf, b"positive"),
        ("7.5", 7.5, b"positive"),
        ("-1", -1.0, b"negative"),
        ("label-of-another-model", 0.5, b"NEUTRAL"),
        ("million-char-label", 0.5, b"x" * 1_000_000),
    ]:
        out[f"old:{name}"] = old_format(score, label)
        out[f"forged:{name}"] = forged(key, score, label)
    out["empty"] = b""
    out["random"] = os.urandom(40)
    out["copied-from-another-key"] = ValueCodec(LABELS).encode(other_key, Entry("negative", 0.9, LATER))
    out["flipped-bit"] = bytes(flipped)
    out["old-format"] = old_format(0.75, b"positive")
    out["another-secret"] = ValueCodec(LABELS, b"a secret that is not ours!").encode(key, Entry("positive", 0.75, LATER))
    return out


@pytest.mark.parametrize("secret", [None, SECRET], ids=["checksum", "mac"])
def test_every_kind_of_garbage_in_redis_is_refused(redis_server, secret):
    codec = ValueCodec(LABELS, secret)
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    kinds: dict[str, bytes] = {}
    keys: dict[str, bytes] = {}
    try:
        for name in garbage(bytes(16), bytes(16)):
            key = os.urandom(16)
            # Values bound to a key (forged, flipped, another secret) are made
            # for the key they are stored under, as an attacker would.
            value = garbage(key, os.urandom(16))[name]
            client.set(b"tg:" + key, value)
            kinds[name], keys[name] = value, key
    finally:
        client.close()
    assert len(kinds) == 7 * 2 + 6  # the 13 kinds, the 7 label/score ones in two formats

    async def main():
        tier = RedisTier(RedisConfig(redis_server.url, timeout_s=2.0))
        try:
            got = await tier.get_many([keys[name] for name in kinds])
            assert tier.counters["errors"] == 0 and tier.counters["hits"] == len(kinds)
            return got
        finally:
            await tier.close()

    reasons = {}
    for name, value in zip(kinds, asyncio.run(main())):
        assert value == kinds[name]  # the tier hands back the bytes as stored
        with pytest.raises(BadValue) as exc:
            codec.decode(keys[name], value, NOW)
        reasons[name] = exc.value.reason
    expected_forged = {"age!-1.1e21": "label", "nan": "score", "inf": "score", "7.5": "score", "-1": "score",
                       "label-of-another-model": "label", "million-char-label": "size"}  # fmt: skip
    for name, reason in expected_forged.items():
        assert reasons[f"forged:{name}"] == (reason if secret is None or reason == "size" else "checksum"), name
    assert reasons["copied-from-another-key"] == reasons["flipped-bit"] == reasons["another-secret"] == "checksum"
    assert reasons["old:million-char-label"] == "size"
    assert {reasons[n] for n in reasons if n.startswith("old")} <= {"size", "format", "checksum"}


@pytest.mark.parametrize("secret", [None, SECRET], ids=["checksum", "mac"])
def test_a_genuine_value_round_trips_through_redis(redis_server, secret):
    codec = ValueCodec(LABELS, secret)
    key = os.urandom(16)

    async def main():
        tier = RedisTier(RedisConfig(redis_server.url, timeout_s=2.0))
        try:
            entry = Entry("negative", 0.125, LATER)
            await tier.put_many([(key, codec.encode(key, entry), entry.expires_at)])
            (value,) = await tier.get_many([key])
            assert codec.decode(key, value, NOW) == entry
            if secret is not None:  # a value written by a gateway without the secret is refused
                await tier.put_many([(key, ValueCodec(LABELS).encode(key, entry), entry.expires_at)])
                (value,) = await tier.get_many([key])
                with pytest.raises(BadValue, match="checksum"):
                    codec.decode(key, value, NOW)
        finally:
            await tier.close()

    asyncio.run(main())
