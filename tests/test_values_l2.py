"""Issue 9 item 3: bit-rot inside data.mdb is never served.

2000 entries are written through LmdbTier as ValueCodec values, L2 is closed
cleanly, and the score bytes of each value are flipped in place inside
data.mdb (as a failing disk or a stray write would): LMDB itself notices
nothing, and the marker says clean. Every damaged value read back must fail
its checksum; the undamaged ones still decode to what was written.
"""

from __future__ import annotations

import hashlib

from cache.entry import BadValue, Entry, ValueCodec
from cache.l2_lmdb import CLEAN_SHUTDOWN_MARKER, LmdbConfig, LmdbTier

MiB = 1 << 20
LABELS = ("negative", "positive")
SCORE_AT = 5  # offset of the float32 score in a value (after version and expiry)
N, DAMAGED = 2100, 2000


def test_flipped_score_bytes_in_data_mdb_fail_the_checksum(tmp_path):
    codec = ValueCodec(LABELS)
    keys = [hashlib.blake2b(f"rot-{i}".encode(), digest_size=16).digest() for i in range(N)]
    entries = [Entry(LABELS[i % 2], (i % 64) / 64, 4_000_000_000.0) for i in range(N)]  # float32-exact scores
    values = [codec.encode(k, e) for k, e in zip(keys, entries)]
    config = LmdbConfig(tmp_path, max_bytes=16 * MiB, map_size=64 * MiB, sync_interval_s=0.05)
    tier = LmdbTier(config)
    tier.put_many_nowait([(k, v, e.expires_at) for k, v, e in zip(keys, values, entries)])
    assert tier.flush(10)
    tier.close_sync()
    assert (tmp_path / CLEAN_SHUTDOWN_MARKER).exists()

    data = bytearray((tmp_path / "data.mdb").read_bytes())
    for value in values[:DAMAGED]:
        at = data.find(value)
        assert at >= 0
        while at >= 0:  # the live copy, and any stale one left in a freed page
            data[at + SCORE_AT + 3] ^= 0x20  # a bit of the score's exponent: 0.5 becomes 2.7e-20
            at = data.find(value, at + 1)
    (tmp_path / "data.mdb").write_bytes(data)

    tier = LmdbTier(config)
    try:
        assert tier.counters["rebuilt"] == 0  # nothing LMDB can see: the values are the damage
        found = tier.get_many_sync(keys)
    finally:
        tier.close_sync()
    assert all(v is not None for v in found)
    reasons = []
    for key, value in zip(keys[:DAMAGED], found[:DAMAGED]):
        try:
            codec.decode(key, value, 0.0)
        except BadValue as exc:
            reasons.append(exc.reason)
    assert reasons == ["checksum"] * DAMAGED
    assert [codec.decode(k, v, 0.0) for k, v in zip(keys[DAMAGED:], found[DAMAGED:])] == entries[DAMAGED:]
