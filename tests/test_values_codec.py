"""ValueCodec: what a value read back from a tier must be before it is served
(issue 9, items 2 and 3 at the codec level), and the cache secret's loading."""

from __future__ import annotations

import math
import os
import struct

import pytest

from cache.entry import MAX_VALUE_BYTES, BadValue, Entry, ValueCodec, load_cache_secret

LABELS = ("negative", "positive")
KEY = bytes(range(16))
OTHER_KEY = bytes(range(1, 17))
SECRET = b"0123456789abcdef-secret"
NOW = 1_700_000_000.0
LATER = NOW + 3600


def test_a_genuine_value_round_trips():
    for codec in (ValueCodec(LABELS), ValueCodec(LABELS, SECRET)):
        entry = Entry("positive", 0.75, LATER)
        data = codec.encode(KEY, entry)
        assert len(data) <= 40  # small: L2's budget holds millions
        assert codec.decode(KEY, data, NOW) == entry
        assert codec.decode(KEY, codec.encode(KEY, Entry("negative", 0.0, LATER)), NOW).score == 0.0
        assert codec.decode(KEY, codec.encode(KEY, Entry("negative", 1.0, LATER)), NOW).score == 1.0


def test_scores_are_kept_to_float32_and_expiry_to_the_second_rounded_down():
    codec = ValueCodec(LABELS)
    got = codec.decode(KEY, codec.encode(KEY, Entry("positive", 0.1, LATER + 0.9)), NOW)
    assert got.score == struct.unpack("<f", struct.pack("<f", 0.1))[0]
    assert got.expires_at == LATER  # never served past the moment asked for


def test_an_expired_value_is_none_not_bad():
    codec = ValueCodec(LABELS)
    data = codec.encode(KEY, Entry("positive", 0.5, NOW))
    assert codec.decode(KEY, data, NOW - 1) is not None
    assert codec.decode(KEY, data, NOW) is None
    assert codec.decode(KEY, codec.encode(KEY, Entry("positive", 0.5, math.nan)), NOW) is None


def test_encode_refuses_what_decode_would_refuse():
    codec = ValueCodec(LABELS)
    with pytest.raises(BadValue) as exc:
        codec.encode(KEY, Entry("NEUTRAL", 0.5, LATER))
    assert exc.value.reason == "label"
    for score in (math.nan, math.inf, -0.01, 1.01):
        with pytest.raises(BadValue) as exc:
            codec.encode(KEY, Entry("positive", score, LATER))
        assert exc.value.reason == "score"


def test_every_kind_of_damage_has_its_reason():
    codec = ValueCodec(LABELS)
    good = codec.encode(KEY, Entry("positive", 0.5, LATER))
    cases = {
        "size": b"\x01" * (MAX_VALUE_BYTES + 1),
        "format": b"",
    }
    for reason, data in cases.items():
        with pytest.raises(BadValue) as exc:
            codec.decode(KEY, data, NOW)
        assert exc.value.reason == reason
    with pytest.raises(BadValue, match="format"):
        codec.decode(KEY, good[:-1], NOW)  # truncated
    with pytest.raises(BadValue, match="format"):
        codec.decode(KEY, b"\x02" + good[1:], NOW)  # a version this code does not know
    with pytest.raises(BadValue, match="checksum"):
        codec.decode(OTHER_KEY, good, NOW)  # a genuine value, copied under another key
    for i in range(len(good)):  # any flipped bit anywhere
        flipped = bytearray(good)
        flipped[i] ^= 0x10
        with pytest.raises(BadValue) as exc:
            codec.decode(KEY, bytes(flipped), NOW)
        assert exc.value.reason in ("format", "checksum")


def test_a_secret_makes_the_tag_a_mac():
    plain, keyed, other = ValueCodec(LABELS), ValueCodec(LABELS, SECRET), ValueCodec(LABELS, b"another secret of 16+ bytes")
    assert keyed.authenticated and not plain.authenticated
    entry = Entry("positive", 0.5, LATER)
    with pytest.raises(BadValue, match="checksum"):
        keyed.decode(KEY, plain.encode(KEY, entry), NOW)  # written without the secret: refused
    with pytest.raises(BadValue, match="checksum"):
        keyed.decode(KEY, other.encode(KEY, entry), NOW)  # tagged with another secret
    with pytest.raises(BadValue, match="checksum"):
        plain.decode(KEY, keyed.encode(KEY, entry), NOW)


def test_codec_settings_are_validated():
    with pytest.raises(ValueError, match="labels"):
        ValueCodec(())
    with pytest.raises(ValueError, match="x" * 256):
        ValueCodec(("x" * 256,))
    with pytest.raises(ValueError, match="at least 16 bytes, got 5"):
        ValueCodec(LABELS, b"short")


# -- the secret ------------------------------------------------------------------


def test_secret_comes_from_the_file_first(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    os.chmod(path, 0o600)
    assert load_cache_secret(str(path), "from-the-environment-0123") == SECRET  # one newline stripped
    path.write_bytes(SECRET + b"\r\n")
    assert load_cache_secret(str(path), None) == SECRET
    path.write_bytes(SECRET + b"\n\n")
    assert load_cache_secret(str(path), None) == SECRET + b"\n"  # only one
    assert load_cache_secret(None, "from-the-environment-0123") == b"from-the-environment-0123"
    assert load_cache_secret(None, None) is None


def test_bad_secrets_are_refused_with_a_clear_message(tmp_path, caplog):
    path = tmp_path / "secret"
    path.write_bytes(b"\n")
    with pytest.raises(ValueError, match=f"the cache secret file {path} is empty"):
        load_cache_secret(str(path), None)
    with pytest.raises(ValueError, match="the cache secret from the environment is empty"):
        load_cache_secret(None, "")
    with pytest.raises(ValueError, match="is 5 bytes; it must be at least 16"):
        load_cache_secret(None, "short")
    with pytest.raises(ValueError, match="cannot read the cache secret file"):
        load_cache_secret(str(tmp_path / "missing"), None)
    path.write_bytes(SECRET)
    os.chmod(path, 0o644)
    with caplog.at_level("WARNING"):
        assert load_cache_secret(str(path), None) == SECRET
    assert "accessible to other users" in caplog.text
