"""Cache keys: a fixed-size hash of the model fingerprint and the normalized text.

Fixed-size keys fit LMDB's 511-byte key limit and keep Redis keys short, and a
hash means no tier stores the raw text (texts may carry personal data). The
fingerprint is part of the key, so a new model never serves an old model's
answers.
"""

from __future__ import annotations

import hashlib
import unicodedata

__all__ = ["KEY_SIZE", "normalize_text", "Keyer"]

KEY_SIZE = 16  # blake2b-128


def normalize_text(text: str) -> str:
    """The form a text is cached and scored under.

    NFC folds equivalent Unicode spellings together; runs of whitespace collapse
    to one space, which the tokenizer would split on anyway, so the model sees
    the same tokens for every spelling that maps to one key.
    """
    return " ".join(unicodedata.normalize("NFC", text).split())


class Keyer:
    """Makes keys for one model fingerprint."""

    __slots__ = ("fingerprint", "_seed")

    def __init__(self, fingerprint: str) -> None:
        if not fingerprint:
            raise ValueError("a model fingerprint is required to make cache keys")
        self.fingerprint = fingerprint
        # Hash the fingerprint once; each key copies this state and adds the text.
        self._seed = hashlib.blake2b(fingerprint.encode() + b"\x00", digest_size=KEY_SIZE)

    def key(self, normalized_text: str) -> bytes:
        h = self._seed.copy()
        h.update(normalized_text.encode("utf-8"))
        return h.digest()

    def key_of_utf8(self, text_utf8: bytes) -> bytes:
        """key() of a text given as its UTF-8 bytes (the hit path hashes the
        request's bytes as they came, without decoding them). Equal to
        key(text) when the bytes are a normalized text; any other bytes give a
        key no normalized text has, i.e. a miss."""
        h = self._seed.copy()
        h.update(text_utf8)
        return h.digest()
