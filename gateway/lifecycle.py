"""Process life: drain and stop on SIGINT/SIGTERM, and never outlive the parent that started us.

A server that is told to stop first drains: its health says NOT_SERVING at
once, and it keeps serving for the drain period, so that load balancers (and
health-checking clients) see it and send new calls elsewhere before anything
is refused. Then it stops taking calls and gives those in flight the grace
period to finish; what is still running after that is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
from dataclasses import dataclass
from typing import Callable, Protocol

__all__ = ["DrainConfig", "Drainable", "StopSignals", "drain_and_stop", "exit_with_parent", "reload_on_sighup"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrainConfig:
    # A few seconds: long enough for a load balancer's or client's health
    # check (typically every 1-5 s) to see NOT_SERVING and move traffic.
    drain_s: float = 5.0
    # In-flight calls (misses waiting for the model, open streams) may finish this long.
    grace_s: float = 10.0

    def __post_init__(self) -> None:
        for name, value in (("drain_s", self.drain_s), ("grace_s", self.grace_s)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value}")

    @property
    def total_s(self) -> float:
        """The longest a drain and stop can take (before cleanup)."""
        return self.drain_s + self.grace_s


class Drainable(Protocol):
    async def drain(self) -> None:
        """Health NOT_SERVING; calls are still served."""

    async def stop(self, grace_s: float) -> None:
        """No new calls; those in flight get grace_s; then close everything."""


class StopSignals:
    """SIGINT and SIGTERM: the first asks for a drain and stop; a second one
    ends the rest of the drain period at once (the grace period still lets
    calls in flight finish). Create it inside the running event loop."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self._hurry = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._received, sig)

    def _received(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.requested.is_set():
            log.warning("%s again: ending the drain period now", name)
            self._hurry.set()
        else:
            log.info("%s: draining (health NOT_SERVING, still serving), then stopping", name)
            self.requested.set()

    async def wait(self) -> None:
        await self.requested.wait()

    async def sleep(self, seconds: float) -> None:
        """Sleeps `seconds`, or less if a second signal comes."""
        if seconds <= 0 or self._hurry.is_set():
            return
        try:
            await asyncio.wait_for(self._hurry.wait(), seconds)
        except TimeoutError:
            pass


def reload_on_sighup(reload: Callable[[], None]) -> None:
    """SIGHUP calls reload() on the running loop: certificates and tokens are
    read again (each file that fails to load is logged and the old one kept).
    Installed only where there is something to reload, so that elsewhere
    SIGHUP keeps its default meaning."""

    def received() -> None:
        log.info("SIGHUP: reading the TLS and token files again")
        reload()

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, received)


async def drain_and_stop(server: Drainable, drain: DrainConfig, signals: StopSignals) -> None:
    await server.drain()
    await signals.sleep(drain.drain_s)
    await server.stop(drain.grace_s)


async def exit_with_parent(parent: int) -> None:
    # A child of `tiergate serve` must not outlive it, even when serve is SIGKILLed.
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.warning("parent process %d is gone; stopping", parent)
    os.kill(os.getpid(), signal.SIGTERM)
