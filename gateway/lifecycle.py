"""Process life: stop on SIGINT/SIGTERM, and never outlive the parent that started us."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal

__all__ = ["until_signalled", "exit_with_parent", "READY_PATTERN", "ready_line"]

READY_PATTERN = re.compile(r"listening on (\S+)")  # every tiergate server prints this once it serves

log = logging.getLogger(__name__)


async def until_signalled() -> None:
    """Returns when SIGINT or SIGTERM arrives."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def exit_with_parent(parent: int) -> None:
    # A child of `tiergate serve` must not outlive it, even when serve is SIGKILLed.
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.warning("parent process %d is gone; stopping", parent)
    os.kill(os.getpid(), signal.SIGTERM)


async def ready_line(proc: asyncio.subprocess.Process, what: str) -> str:
    """The child's "listening on HOST:PORT" line (it reads the child's stdout until then)."""
    while True:
        raw = await proc.stdout.readline()
        if not raw:
            code = await proc.wait()
            raise RuntimeError(f"{what} exited with status {code} before it was ready (see its log above)")
        line = raw.decode(errors="replace").strip()
        if READY_PATTERN.search(line):
            return line
