"""The gateway's plain core: validate texts, resolve them through the cache
tiers, and send only the misses to the inference service."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cache import Answer, Entry, Keyer, Scored, TieredCache, normalize_text
from gateway.errors import InvalidInput, Overloaded
from inference.client import InferenceUnavailable
from inference.replicas import ReplicaSet

__all__ = ["Limits", "Classifier"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_text_bytes: int = 8192     # UTF-8 bytes of one text
    max_batch: int = 1000          # texts in one ClassifyBatch call
    default_timeout_s: float = 30.0  # for a miss when the caller sets no deadline
    max_pending_misses: int = 4096   # texts of this process waiting for the model; more: RESOURCE_EXHAUSTED

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
    def __init__(self, cache: TieredCache, inference: ReplicaSet, limits: Limits = Limits()) -> None:
        self.cache = cache
        self.inference = inference
        self.limits = limits
        self._keyer: Keyer | None = None

    @property
    def model_display(self) -> str:
        model = self.inference.model
        return model.display if model is not None else ""

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
        return normalized

    def check_batch_size(self, count: int) -> None:
        if count > self.limits.max_batch:
            raise InvalidInput(
                f"the batch has {count} texts; the limit is {self.limits.max_batch} (gateway --max-batch): "
                "split it into several calls"
            )

    def _current_keyer(self) -> Keyer:
        model = self.inference.model
        if model is None:
            raise InferenceUnavailable("the gateway has not reached the inference service yet")
        keyer = self._keyer
        if keyer is None or keyer.fingerprint != model.fingerprint:
            keyer = self._keyer = Keyer(model.fingerprint)
        return keyer

    def held_in_l1(self, normalized: str) -> bool:
        """Whether L1 holds this text's answer for the current model (without touching its recency)."""
        model = self.inference.model
        return model is not None and self._current_keyer().key(normalized) in self.cache.l1

    async def classify(self, normalized_texts: list[str], timeout: float | None) -> list[Answer]:
        """Answers for normalized texts, in order, each from the nearest tier that holds it."""
        keyer = self._current_keyer()
        keys = [keyer.key(t) for t in normalized_texts]
        timeout = timeout if timeout is not None else self.limits.default_timeout_s

        async def score(texts: list[str]) -> Scored:
            pending = self.inference.in_flight
            if pending + len(texts) > self.limits.max_pending_misses:
                raise Overloaded(
                    f"the gateway already has {pending} texts waiting for the model (limit "
                    f"{self.limits.max_pending_misses}, --max-pending-misses); retry with backoff"
                )
            results, scored_by = await self.inference.score(texts, timeout)
            entries = [Entry(r[0], r[1]) if isinstance(r, tuple) else r for r in results]
            # A model swapped while these were in flight scored them: answer, but
            # do not store them under the old model's keys.
            return Scored(entries, cacheable=scored_by == keyer.fingerprint)

        return await self.cache.resolve(keys, normalized_texts, score)
