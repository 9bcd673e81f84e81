"""Rows for the job, read in a thread of their own.

Reading can block: a slow producer on stdin, a file on a network disk. On the
event loop that would freeze the job's calls, its Ctrl-C handling and, in the
embedded stack, the gateway itself, and rows already read would wait for a
full call's worth before being sent. The thread reads ahead at most `buffer`
rows; the job takes whatever has arrived.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import Iterator

from gateway.classify.rows import Row

__all__ = ["RowFeed"]

_PUT_POLL_S = 0.1  # how often a reader blocked on a full buffer checks whether the job has ended


@dataclass(frozen=True)
class _End:
    error: BaseException | None = None  # what stopped the reading, if it was not the end of the input


class RowFeed:
    def __init__(self, rows: Iterator[Row], buffer: int) -> None:
        self.buffer = buffer
        self._loop = asyncio.get_running_loop()
        self._items: queue.Queue = queue.Queue(maxsize=buffer)
        self._closed = threading.Event()
        self._waiting = False
        self._arrived = asyncio.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._read, args=(rows,), name="tiergate-classify-rows", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._items.put(item, timeout=_PUT_POLL_S)
            except queue.Full:
                continue
            if self._waiting:
                self._notify()
            return True
        return False

    def _notify(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._arrived.set)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    def _read(self, rows: Iterator[Row]) -> None:
        end = _End()
        try:
            for row in rows:
                if not self._put(row):
                    return
        except BaseException as exc:  # handed to the job, which raises it
            end = _End(exc)
        self._put(end)

    async def take(self, n: int, wake: asyncio.Event, stopped) -> tuple[list[Row], bool]:
        """(up to n rows, whether the input has ended). Waits for a row unless
        one is there, the input ended, or stopped() (then, or when `wake` is
        set meanwhile, it may return none). Raises what stopped the reading."""
        rows: list[Row] = []
        if self._ended or n <= 0:
            return rows, self._ended
        while len(rows) < n:
            try:
                item = self._items.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _End):
                self._ended = True
                if item.error is not None:
                    raise item.error
                return rows, True
            rows.append(item)
        if rows:
            return rows, False
        self._arrived.clear()
        self._waiting = True  # before the check below: a row put after it wakes us
        try:
            if self._items.empty() and not stopped():
                wake.clear()  # stopped() was just false, and nothing ran since: no wake-up is lost
                waits = [asyncio.ensure_future(self._arrived.wait()), asyncio.ensure_future(wake.wait())]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
        finally:
            self._waiting = False
        return rows, False

    def close(self) -> None:
        self._closed.set()
