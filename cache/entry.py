"""What the cache stores: a label, its score and until when it may be served;
the codec that turns one into bytes a tier keeps, and checks bytes read back;
and where an answer came from.

Tiers store opaque bytes. Whatever comes back from L2 (a file any local bug or
disk can damage) or L3 (a server anyone with its password can write) is
untrusted input: ValueCodec.decode serves it only if it is the right size and
format, carries a valid tag bound to its cache key, names a label of this model
and holds a finite score in [0, 1].

The tag is blake2b over the cache key and the value. Without a secret it is a
checksum: it catches bit-rot, truncation and a value copied to another key,
but not an attacker, who can compute it too (the label and score checks still
bound what such a value can claim). With a secret (load_cache_secret) it is a
MAC: whoever can write to Redis without the secret cannot choose an answer.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import math
import os
import stat
import struct
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "BadValue",
    "Entry",
    "MAX_VALUE_BYTES",
    "MIN_SECRET_BYTES",
    "Source",
    "ValueCodec",
    "load_cache_secret",
]

log = logging.getLogger(__name__)


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
    # Unix seconds after which this answer must not be served: absolute, set
    # when the model scored it, so a promotion between tiers keeps the
    # remaining lifetime instead of granting a fresh one.
    expires_at: float


class BadValue(ValueError):
    """A stored value the cache cannot vouch for.

    `reason` is short and safe as a metric label: "size", "format",
    "checksum", "label" or "score"; `detail` is for humans.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# Anything larger read back from a tier is refused before any parsing: a
# genuine value is a few dozen bytes, and a hostile one must not cost more.
MAX_VALUE_BYTES = 512
MIN_SECRET_BYTES = 16

# Layout (little-endian): version u8, expires_at u32 (unix seconds, rounded
# down so a value never outlives its entry), score f32, label length u8, the
# UTF-8 label, then a 16-byte tag over (key length u16, key, everything before
# the tag). Version 1; a genuine value of label "positive" is 34 bytes.
_VERSION = 1
_HEAD = struct.Struct("<BIfB")
_TAG_BYTES = 16
_MIN_BYTES = _HEAD.size + 1 + _TAG_BYTES  # a label has at least one byte
_U32_MAX = 2**32 - 1
_PERSON = b"tiergate-value1"  # blake2b personalization: these tags mean nothing elsewhere


class ValueCodec:
    """Encodes/decodes an Entry for one model's label set, bound to its cache key.

    Cheap to call on the hit path: the label table and the keyed hash state
    are built once; a decode is a struct unpack, one blake2b of ~50 bytes and
    a dict lookup.
    """

    __slots__ = ("labels", "authenticated", "_by_bytes", "_label_bytes", "_hash")

    def __init__(self, labels: Sequence[str], secret: bytes | None = None) -> None:
        labels = tuple(labels)
        if not labels:
            raise ValueError("a ValueCodec needs the model's labels, got none")
        by_bytes: dict[bytes, str] = {}
        for label in labels:
            raw = label.encode("utf-8")
            if not 1 <= len(raw) <= 255:
                raise ValueError(f"a label must be 1 to 255 bytes of UTF-8, got {label!r}")
            by_bytes[raw] = label
        if secret is not None and len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the cache secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
        self.labels = labels
        self.authenticated = secret is not None
        self._by_bytes = by_bytes
        self._label_bytes = {label: raw for raw, label in by_bytes.items()}
        # blake2b takes a key of at most 64 bytes: derive one from a secret of
        # any length, so a long secret file works and all of it counts.
        key = b"" if secret is None else hashlib.blake2b(secret, digest_size=32, person=b"tiergate-key").digest()
        self._hash = hashlib.blake2b(digest_size=_TAG_BYTES, key=key, person=_PERSON)

    def _tag(self, key: bytes, body: bytes) -> bytes:
        h = self._hash.copy()
        h.update(len(key).to_bytes(2, "little"))
        h.update(key)
        h.update(body)
        return h.digest()

    def encode(self, key: bytes, entry: Entry) -> bytes:
        """The bytes to store under `key`. Raises BadValue for an entry that
        decode would refuse (a label not of this model, a score that is not
        finite or not in [0, 1]): such a value is never worth writing."""
        raw = self._label_bytes.get(entry.label)
        if raw is None:
            raise BadValue("label", f"{entry.label!r} is not a label of this model")
        score = entry.score
        if not (math.isfinite(score) and 0.0 <= score <= 1.0):
            raise BadValue("score", f"{score!r} is not a finite score in [0, 1]")
        expires_at = entry.expires_at
        expires = 0 if not expires_at > 0 else min(int(expires_at), _U32_MAX)  # NaN and negatives: expired
        body = _HEAD.pack(_VERSION, expires, score, len(raw)) + raw
        return body + self._tag(key, body)

    def decode(self, key: bytes, data: bytes, now: float) -> Entry | None:
        """The entry stored in `data` under `key`; None when it is genuine but
        expired (expires_at <= now). Raises BadValue for anything else wrong."""
        n = len(data)
        if n > MAX_VALUE_BYTES:
            raise BadValue("size", f"{n} bytes, more than {MAX_VALUE_BYTES}")
        if n < _MIN_BYTES:
            raise BadValue("format", f"{n} bytes, shorter than any value")
        version, expires, score, label_len = _HEAD.unpack_from(data)
        if version != _VERSION:
            raise BadValue("format", f"unknown version {version}")
        end = _HEAD.size + label_len
        if n != end + _TAG_BYTES:
            raise BadValue("format", f"{n} bytes, but the label length says {end + _TAG_BYTES}")
        data = bytes(data)
        if not hmac.compare_digest(data[end:], self._tag(key, data[:end])):
            what = "MAC" if self.authenticated else "checksum"
            raise BadValue("checksum", f"{what} mismatch (damaged, copied from another key, or forged)")
        label = self._by_bytes.get(data[_HEAD.size : end])
        if label is None:
            raise BadValue("label", "not a label of this model")
        if not (math.isfinite(score) and 0.0 <= score <= 1.0):
            raise BadValue("score", f"{score!r} is not a finite score in [0, 1]")
        if expires <= now:
            return None
        return Entry(label, score, float(expires))


def load_cache_secret(path: str | None, env_value: str | None) -> bytes | None:
    """The cache MAC secret from a file (preferred) or an environment
    variable's value; None when neither is given. One trailing newline is
    stripped (files written by `echo`). Raises ValueError, with a message
    naming where it came from, for an empty or too-short secret or an
    unreadable file."""
    if path is not None:
        try:
            with open(path, "rb") as f:
                secret = f.read()
                mode = os.fstat(f.fileno()).st_mode
        except OSError as exc:
            raise ValueError(f"cannot read the cache secret file {path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("the cache secret file %s is accessible to other users (mode %o); chmod 600 it",
                        path, stat.S_IMODE(mode))  # fmt: skip
        where = f"the cache secret file {path}"
    elif env_value is not None:
        secret = env_value.encode("utf-8")
        where = "the cache secret from the environment"
    else:
        return None
    if secret.endswith(b"\r\n"):
        secret = secret[:-2]
    elif secret.endswith(b"\n"):
        secret = secret[:-1]
    if not secret:
        raise ValueError(f"{where} is empty")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"{where} is {len(secret)} bytes; it must be at least {MIN_SECRET_BYTES}")
    return secret
