"""A small circuit breaker, so a dead remote tier costs nothing per request.

Without one, every request would pay a connect or read timeout against a Redis
that is down or frozen. With it, after a few consecutive failures the tier is
skipped outright (allow() is a couple of attribute reads) until a cooldown has
passed; then a single probe call is let through to find out whether the remote
is back.
"""

from __future__ import annotations

import enum
import time
from typing import Callable

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(str, enum.Enum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls are refused until the cooldown has passed
    HALF_OPEN = "half_open"  # one probe call is out; the others are refused


class CircuitBreaker:
    """closed -> open after `failure_threshold` consecutive failures; open ->
    half-open after `cooldown_s`, letting ONE probe through; the probe's success
    closes the breaker, its failure opens it again for another cooldown.

    Not thread-safe: it belongs to one event loop, like the client it guards.
    """

    __slots__ = ("failure_threshold", "cooldown_s", "_clock", "_state", "_failures", "_opened_at", "_probe_at",
                 "_on_change")

    def __init__(
        self,
        failure_threshold: int = 3,
        cooldown_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        """`on_change(old, new)` is told every change of state (to log it, say)."""
        if failure_threshold < 1:
            raise ValueError(f"breaker failure_threshold must be >= 1, got {failure_threshold}")
        if not cooldown_s > 0:
            raise ValueError(f"breaker cooldown_s must be > 0, got {cooldown_s}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_at = 0.0
        self._on_change = on_change

    def _set(self, state: BreakerState) -> None:
        old, self._state = self._state, state
        if old is not state and self._on_change is not None:
            self._on_change(old, state)

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """True when a call may go out now. Call it once per call you then make,
        and report that call's outcome with record_success/record_failure."""
        state = self._state
        if state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if state is BreakerState.OPEN:
            if now - self._opened_at < self.cooldown_s:
                return False
            self._probe_at = now
            self._set(BreakerState.HALF_OPEN)
            return True
        # HALF_OPEN: a probe is out. If it never reported back (its caller was
        # cancelled before it could), do not stay stuck: after another cooldown
        # let a fresh probe through.
        if now - self._probe_at >= self.cooldown_s:
            self._probe_at = now
            return True
        return False

    def refusing(self) -> bool:
        """True when allow() would refuse a call now. Changes nothing (no probe
        is let out), so a caller can skip work before it takes its turn to call."""
        state = self._state
        if state is BreakerState.CLOSED:
            return False
        since = self._opened_at if state is BreakerState.OPEN else self._probe_at
        return self._clock() - since < self.cooldown_s

    def record_success(self) -> None:
        if self._state is BreakerState.OPEN:
            # A call that went out before the breaker opened: it says nothing
            # about the remote now, and only the probe may close the breaker.
            return
        self._failures = 0
        self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._open()
            return
        self._failures += 1
        if self._state is BreakerState.CLOSED and self._failures >= self.failure_threshold:
            self._open()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._failures = 0
        self._set(BreakerState.OPEN)

    def __repr__(self) -> str:
        return f"CircuitBreaker(state={self._state.value}, failures={self._failures})"
