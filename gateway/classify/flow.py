"""How fast `tiergate classify` sends: an adaptive window of texts in flight and jittered backoff.

A batch job is the one caller that can always wait, so backpressure from the
gateway (RESOURCE_EXHAUSTED: the model's queue is full) means "slow down",
never "give up". The window works as TCP's congestion window does, with texts
for packets: it grows by about one call's worth of texts per window of
answered texts while calls succeed, and halves when the gateway refuses (at
most once per window, so that the many calls refused by one full queue count
as one signal). The refused call is retried after a jittered, growing pause,
in pieces no bigger than the shrunken window, so even a queue smaller than
one call's texts is worked through.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

__all__ = ["MIN_CALLS", "RETRY_CODES", "SLOW_DOWN_CODES", "AdaptiveWindow", "Backoff"]

# The gateway is busy, restarting, or was slower than the call's deadline:
# the same call can succeed later.
RETRY_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
                         grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED})
# ...and of those, the ones that say "too much at once".
SLOW_DOWN_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED})
MIN_CALLS = 4  # calls the window is split into at least


class AdaptiveWindow:
    """Texts allowed in flight: additive increase, multiplicative decrease."""

    def __init__(self, call_texts: int, *, max_calls: int = 16, initial_calls: int = 2) -> None:
        if call_texts < 1:
            raise ValueError(f"call_texts must be >= 1, got {call_texts}")
        self.call_texts = call_texts
        self.max_texts = float(call_texts * max_calls)
        self.limit = float(min(call_texts * initial_calls, self.max_texts))
        self.epoch = 0       # +1 on every decrease; a call remembers the epoch it was sent in
        self.decreases = 0

    def call_size(self) -> int:
        """Texts for the next call: a full call, or less while the window holds
        fewer than MIN_CALLS of them. A call is answered only when all its texts
        are, so a window of one call would leave the model idle from the end of
        one call until the next arrives; several smaller ones keep it fed."""
        return max(1, min(self.call_texts, int(self.limit / MIN_CALLS)))

    def may_send(self, in_flight: int, size: int) -> bool:
        return in_flight == 0 or in_flight + size <= self.limit

    def on_success(self, texts: int) -> None:
        self.limit = min(self.max_texts, self.limit + texts * self.call_texts / self.limit)

    def on_slow_down(self, sent_in_epoch: int) -> None:
        """A call sent in `sent_in_epoch` was refused: halve, unless that already
        happened since it was sent (one full queue refuses many calls at once)."""
        if sent_in_epoch == self.epoch:
            self.limit = max(1.0, self.limit / 2)
            self.epoch += 1
            self.decreases += 1


@dataclass(frozen=True)
class Backoff:
    """Exponential pauses with jitter, each between half and all of its
    ceiling: no two retrying calls wake together and hit a recovering gateway
    as one wave, and none retries at once."""

    first_s: float = 0.05
    max_s: float = 5.0

    def pause_s(self, attempt: int, rng: random.Random = random._inst) -> float:
        """The pause before retry number `attempt` (1 for the first retry)."""
        ceiling = min(self.max_s, self.first_s * (2 ** min(attempt - 1, 30)))
        return rng.uniform(ceiling / 2, ceiling)
