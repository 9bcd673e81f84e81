"""The event loop every tiergate server process runs on: uvloop where it is
installed (a dependency on Linux and macOS), else asyncio's own.

Why: at a few hundred misses a second the gateway's CPU is mostly per-call
overhead, and asyncio's pure-Python loop (_run_once, call_soon, timers) is
about a tenth of it. Two stacks of the same code side by side on a 2-core
EPYC VM, one on each loop, misses at c=32 alternated for 8 s, 5 rounds: the
gateway spent 1.00-1.13 ms of a core per miss on uvloop (mean 1.06) against
1.01-1.20 (mean 1.12) on asyncio's loop, the same texts/s within 1%; one
caller at a time, 4 rounds, the stack added 2.89-3.75 ms to each forward
pass against 2.99-5.23 ms, less in every round. grpc.aio needs only
add_reader from the loop, which uvloop has.

$TIERGATE_EVENT_LOOP picks it: unset or "auto" (uvloop where installed),
"uvloop" (fail when it is not), "asyncio" (asyncio's own loop).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["ENV", "EventLoopChoiceError", "loop_factory", "loop_name", "run", "running_loop_name"]

log = logging.getLogger("tiergate")

ENV = "TIERGATE_EVENT_LOOP"
_CHOICES = ("auto", "uvloop", "asyncio")

T = TypeVar("T")


class EventLoopChoiceError(ValueError):
    """$TIERGATE_EVENT_LOOP names a loop this process cannot run."""


def _choice() -> str:
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise EventLoopChoiceError(f"${ENV} must be one of {', '.join(_CHOICES)}; got {choice!r}")
    return choice


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What asyncio.Runner should create loops with (None: asyncio's own)."""
    choice = _choice()
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise EventLoopChoiceError(
                f"${ENV}=uvloop, but uvloop is not installed: pip install uvloop, or unset ${ENV}"
            ) from None
        return None
    return uvloop.new_event_loop


def _label(on_uvloop: bool) -> str:
    if not on_uvloop:
        return "asyncio"
    import uvloop

    return f"uvloop {uvloop.__version__}"


def loop_name() -> str:
    """e.g. "uvloop 0.23.0" or "asyncio": the loop run() would use."""
    return _label(loop_factory() is not None)


def running_loop_name() -> str:
    """The loop this coroutine runs on, named as loop_name() does: what is, not what was asked."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    return _label(isinstance(asyncio.get_running_loop(), uvloop.Loop))


async def _announced(main: Coroutine[Any, Any, T]) -> T:
    log.info("event loop: %s", running_loop_name())
    return await main


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on the chosen loop (same Ctrl-C and cleanup
    behaviour); logs which loop it is at INFO as it starts."""
    try:
        factory = loop_factory()
    except EventLoopChoiceError:
        main.close()  # never awaited: no "coroutine was never awaited" warning on top of the error
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_announced(main))
