"""The gateway's plain core: validate texts, answer repeats from L1, resolve
the rest through the cache tiers and the Upstream that scores misses.

The model the gateway serves is the Upstream's elected model; a change of it
is seen as a new `generation` number (one integer compare per call), which
empties L1 and switches the key hash. Nothing here touches protobuf except
through the renderer it is handed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from cache import Keyer, ModelRef, TieredCache, normalize_text
from cache.entry import Source
from cache.tiered import Answer
from cache.upstream import Upstream
from protos.errors import InvalidInput, Unavailable

__all__ = ["Limits", "Classifier"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_text_bytes: int = 8192     # UTF-8 bytes of one text
    max_batch: int = 1000          # texts in one ClassifyBatch call
    default_timeout_s: float = 30.0  # for a miss when the caller sets no deadline
    max_pending_misses: int = 4096   # texts of this process waiting for Redis or the model; more: RESOURCE_EXHAUSTED

    def __post_init__(self) -> None:
        if not 1 <= self.max_text_bytes <= 1 << 20:
            raise ValueError(f"max_text_bytes must be in 1..1048576, got {self.max_text_bytes}")
        if not 1 <= self.max_batch <= 100_000:
            raise ValueError(f"max_batch must be in 1..100000, got {self.max_batch}")
        if self.default_timeout_s <= 0:
            raise ValueError(f"default_timeout_s must be > 0, got {self.default_timeout_s}")
        if self.max_pending_misses < 1:
            raise ValueError(f"max_pending_misses must be >= 1, got {self.max_pending_misses}")


class Classifier:
    def __init__(self, cache: TieredCache, upstream: Upstream, limits: Limits = Limits()) -> None:
        self.cache = cache
        self.upstream = upstream
        self.limits = limits
        self.fast_hits = 0  # L1 hits answered by hit(); the cache counts the others
        self.answers = [0] * (max(Source) + 1)  # texts answered by classify(), by Source (hit()'s: fast_hits)
        self._generation = -1
        self._model: ModelRef | None = None
        self._keyer: Keyer | None = None

    def current_model(self) -> ModelRef | None:
        """The model misses go to now; follows the Upstream's changes."""
        upstream = self.upstream
        if upstream.generation != self._generation:
            self._generation = upstream.generation
            model = self._model = upstream.model
            self._keyer = Keyer(model.fingerprint) if model is not None else None
            self.cache.l1.use_model(model)
        return self._model

    def _hit_keyer(self) -> Keyer | None:
        if self.upstream.generation != self._generation:
            self.current_model()
        return self._keyer

    def hit(self, text_utf8: bytes) -> bytes | None:
        """The rendered L1 response for a text given as its request's UTF-8
        bytes, or None (not in L1, or not normalized: take the full path)."""
        keyer = self._hit_keyer()
        if keyer is None:
            return None
        found = self.cache.l1.response(keyer.key_of_utf8(text_utf8))
        if found is not None:
            self.fast_hits += 1
        return found

    def hit_many(self, texts) -> list[bytes] | None:
        """The framed L1 responses of every text, or None unless all are held
        (normalized spellings only; the full path takes any other)."""
        keyer = self._hit_keyer()
        if keyer is None:
            return None
        key_of = keyer.key_of_utf8
        found = self.cache.l1.framed_responses([key_of(t.encode("utf-8")) for t in texts])
        if found is not None:
            self.fast_hits += len(found)
        return found

    def normalize(self, text: str, index: int | None = None) -> str:
        """The text as it is cached and scored; InvalidInput says what is wrong with it."""
        where = "text" if index is None else f"texts[{index}]"
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.limits.max_text_bytes:
            raise InvalidInput(
                f"{where} is {size} bytes of UTF-8; the limit is {self.limits.max_text_bytes} (gateway --max-text-bytes)"
            )
        normalized = normalize_text(text)
        if not normalized:
            raise InvalidInput(f"{where} is empty or only whitespace; send the text to classify")
        # NFC can lengthen a text (up to 3x in UTF-8). The inference service
        # checks the same limit on what it is sent, the normalized text, so
        # check that too rather than have the model refuse it later.
        if size * 3 > self.limits.max_text_bytes:
            size = len(normalized.encode("utf-8", "surrogatepass"))
            if size > self.limits.max_text_bytes:
                raise InvalidInput(f"{where} is {size} bytes of UTF-8 once normalized (NFC); the limit is "
                                   f"{self.limits.max_text_bytes} (gateway --max-text-bytes)")
        return normalized

    def check_batch_size(self, count: int) -> None:
        if count > self.limits.max_batch:
            raise InvalidInput(
                f"the batch has {count} texts; the limit is {self.limits.max_batch} (gateway --max-batch): "
                "split it into several calls"
            )

    def deadline(self, time_remaining: float | None) -> float:
        """A caller's time.monotonic() deadline (any value a client can send works)."""
        remaining = time_remaining if time_remaining is not None else self.limits.default_timeout_s
        return time.monotonic() + max(0.0, remaining)

    async def classify(self, normalized_texts: list[str], deadline: float) -> list[Answer]:
        """Answers for normalized texts, in order, each from the nearest tier that holds it."""
        model = self.current_model()
        if model is None:
            raise Unavailable("the gateway has not reached the inference service yet; retry with backoff")
        keyer = self._keyer
        keys = [keyer.key(t) for t in normalized_texts]
        answers = await self.cache.resolve(keys, normalized_texts, model, deadline)
        counts = self.answers
        for answer in answers:
            counts[answer.source] += 1
        return answers

    def answers_by_source(self) -> list[int]:
        """Texts answered so far, indexed by Source, fast L1 hits included."""
        counts = list(self.answers)
        counts[Source.L1] += self.fast_hits
        return counts

