"""An in-memory Upstream (cache.upstream) for unit tests of the layers above it.

It scores deterministically from the text alone, can hold every call at a
gate, can answer as another model, and records what it was asked. Integration
tests use the real inference service instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Callable, Sequence

from cache.upstream import Failed, ModelRef, Outcome, Scored
from protos.errors import DeadlineExceeded

__all__ = ["MODEL", "OTHER_MODEL", "FakeUpstream", "label_for", "score_for"]

MODEL = ModelRef("fake", ("negative", "positive"), "f1f1f1f1f1f1f1f1", "cpu", "float32")
OTHER_MODEL = ModelRef("fake", ("negative", "positive"), "f2f2f2f2f2f2f2f2", "cpu", "float32")


def label_for(text: str) -> str:
    return "positive" if hashlib.blake2b(text.encode(), digest_size=1).digest()[0] % 2 else "negative"


def score_for(text: str) -> float:
    # Exactly representable in float32, so values survive the tiers' encoding unchanged.
    return 0.5 + (hashlib.blake2b(text.encode(), digest_size=1).digest()[0] % 64) / 128


class FakeUpstream:
    def __init__(self, model: ModelRef | None = MODEL, *, gate: asyncio.Event | None = None,
                 outcome: Callable[[str, float | None], Outcome] | None = None) -> None:
        self.model = model
        self.generation = 1
        self.gate = gate
        self.calls: list[list[str]] = []
        self.deadlines: list[float | None] = []
        self.cancelled = 0
        self.scored_by: ModelRef | None = None  # answer as this model instead of self.model
        self._outcome = outcome

    def switch_model(self, model: ModelRef) -> None:
        self.model = model
        self.generation += 1

    def outcome(self, text: str, deadline: float | None, by: ModelRef) -> Outcome:
        if self._outcome is not None:
            return self._outcome(text, deadline)
        return Scored(label_for(text), score_for(text), by)

    async def score(self, texts: Sequence[str], deadline: float | None) -> list[Outcome]:
        self.calls.append(list(texts))
        self.deadlines.append(deadline)
        by = self.scored_by or self.model  # like a real stream: the model it was sent to scores it
        try:
            if self.gate is not None:
                if deadline is None:
                    await self.gate.wait()
                else:
                    try:
                        await asyncio.wait_for(self.gate.wait(), max(0.0, deadline - time.monotonic()))
                    except TimeoutError:
                        return [Failed(DeadlineExceeded("deadline exceeded (fake)"))] * len(texts)
            else:
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return [self.outcome(t, deadline, by) for t in texts]
