"""The one helper for child processes: spawn, ready line, stop, restart with backoff.

Every tiergate server prints one "listening on HOST:PORT" line once it serves
(READY is the only copy of that pattern). A Child is one such process (or any
other: gostub, the trivial server): it is spawned with argv, env and optional
bytes for its stdin; a thread reads its stdout (so it never blocks on a full
pipe), finds the ready line and hands every line to `output`; another waits
for it to exit. Both sync code (bench, tests) and async code (the gateway's
workers, the inference child of `serve`) wait on the same object: the async
waits never block the event loop and hold no executor thread.

Stopping is SIGTERM, then SIGKILL once `timeout_s` has passed: a tiergate
server drains on SIGTERM, so callers give it drain + grace + some slack.
`keep_restarting` starts a child again whenever it exits, with backoff.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import signal
import subprocess
import threading
import time
from typing import IO, Callable, Mapping, Sequence

__all__ = ["READY", "Child", "keep_restarting"]

READY = re.compile(r"listening on (\S+)")  # every tiergate server prints this once it serves

log = logging.getLogger(__name__)

_TAIL_LINES = 40  # of stdout, kept for the error when a child never became ready


class _Flag:
    """A threading.Event that async code can await too; set from a Child's threads."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    def set(self) -> None:
        with self._lock:
            self._event.set()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:
                pass  # that loop is closed: nobody waits there any more

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout_s: float | None) -> bool:
        return self._event.wait(timeout_s)

    async def wait_async(self) -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._event.is_set():
                return
            self._waiters.append((loop, future))
        try:
            await future
        finally:
            with self._lock:
                if (loop, future) in self._waiters:
                    self._waiters.remove((loop, future))


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Child:
    """One child process, started again by start() after it exited.

    `argv` may be changed between runs (a restarted server keeps its port).
    `stderr` is what Popen takes: None inherits ours, subprocess.STDOUT merges
    it into `output`, an open file logs it there. `new_session`: the child
    does not get the terminal's Ctrl-C; its parent decides when it stops.
    """

    def __init__(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 stdin: bytes | None = None, output: Callable[[str], None] | None = None,
                 stderr: int | IO | None = None, new_session: bool = False) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self._stdin = stdin
        self._output = output
        self._stderr = stderr
        self._new_session = new_session
        self.proc: subprocess.Popen | None = None
        self.ready_line = ""
        self.address: str | None = None  # HOST:PORT from the ready line
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._ready = _Flag()
        self._exited = _Flag()
        self._terminated = False  # SIGTERM sent to this run: once (a tiergate server takes a second as "hurry")
        self._pump: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and not self._exited.is_set()

    @property
    def ready_now(self) -> bool:
        """This run printed its ready line and has not exited."""
        return self.running and self._ready.is_set()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self._exited.is_set() else None

    def start(self) -> Child:
        """Spawns it (again) and returns at once; wait_ready()/ready() wait for its ready line.

        Cheap enough for the event loop: Popen is what asyncio's own
        subprocess support calls there too."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.proc.pid})")
        proc = subprocess.Popen(
            self.argv, env=self.env, stdout=subprocess.PIPE, stderr=self._stderr,
            stdin=subprocess.PIPE if self._stdin is not None else subprocess.DEVNULL,
            start_new_session=self._new_session,
        )
        # New flags only for a process that exists: a failed Popen leaves the last run's as they were.
        self.proc, self._ready, self._exited, self._terminated = proc, _Flag(), _Flag(), False
        self._tail.clear()
        ready, exited = self._ready, self._exited
        self._pump = threading.Thread(target=self._read_stdout, args=(proc, ready), daemon=True,
                                      name=f"{self.name} stdout")
        self._pump.start()
        threading.Thread(target=self._watch, args=(proc, exited), daemon=True, name=f"{self.name} exit").start()
        return self

    def _read_stdout(self, proc: subprocess.Popen, ready: _Flag) -> None:
        output = self._output
        with proc.stdout as stdout:
            for raw in stdout:
                line = raw.decode(errors="replace")
                self._tail.append(line)
                if not ready.is_set():
                    match = READY.search(line)
                    if match:
                        self.ready_line, self.address = line.strip(), match.group(1)
                        ready.set()
                if output is not None:
                    try:
                        output(line)
                    except Exception:  # noqa: BLE001  keep reading: a child must never block on a full pipe
                        log.exception("passing on the output of %s failed; dropping the rest of it", self.name)
                        output = None

    def _watch(self, proc: subprocess.Popen, exited: _Flag) -> None:
        if self._stdin is not None:
            # Here, not on the caller's thread: a child that does not read
            # its stdin must not block whoever started it.
            try:
                with proc.stdin:
                    proc.stdin.write(self._stdin)
            except OSError:
                pass  # it exited first; its exit status says why
        proc.wait()
        exited.set()

    def _not_ready(self, why: str) -> RuntimeError:
        tail = "".join(self._tail).rstrip()
        return RuntimeError(f"{self.name} {why} before it was ready" + (f"; its last output:\n{tail}" if tail else
                                                                           " (see its log above)"))

    def wait_ready(self, timeout_s: float) -> str:
        """Blocks until the ready line; on exit or timeout stops it and raises RuntimeError."""
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            if self._exited.is_set():
                raise self._not_ready(f"exited with status {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise self._not_ready(f"did not print its ready line within {timeout_s:.0f} s")
        return self.ready_line

    async def ready(self, timeout_s: float) -> str:
        """wait_ready() for async code."""
        ready = asyncio.ensure_future(self._ready.wait_async())
        exited = asyncio.ensure_future(self._exited.wait_async())
        try:
            await asyncio.wait((ready, exited), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            exited.cancel()
        if self._ready.is_set():
            return self.ready_line
        if self._exited.is_set():
            raise self._not_ready(f"exited with status {self.proc.returncode}")
        await self.stop_async()
        raise self._not_ready(f"did not print its ready line within {timeout_s:.0f} s")

    async def exited(self) -> int:
        """Waits until this run of it exits; its status."""
        await self._exited.wait_async()
        return self.proc.returncode

    def _signal(self, sig: int) -> None:
        if not self._exited.is_set():  # its pid may belong to another process once reaped
            self.proc.send_signal(sig)

    def send_signal(self, sig: int) -> None:
        """Sends `sig` to this run, unless it has exited (e.g. SIGHUP: reload)."""
        if self.proc is not None:
            self._signal(sig)

    def terminate(self) -> None:
        """SIGTERM (once per run), without waiting: a tiergate server starts its drain."""
        if self.proc is not None and not self._terminated:
            self._terminated = True
            self._signal(signal.SIGTERM)

    def wait(self, timeout_s: float | None = None) -> int | None:
        """The exit status once this run has exited (and its output is read); None if still running after timeout_s."""
        if self.proc is None or not self._exited.wait(timeout_s):
            return None
        self._join_pump()
        return self.proc.returncode

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (unless terminate() sent it), SIGKILL after timeout_s; the
        exit status (None if never started)."""
        if self.proc is None:
            return None
        self.terminate()
        if self.wait(timeout_s) is None:
            log.warning("%s (pid %d) did not stop within %.0f s of SIGTERM; killing it",
                        self.name, self.proc.pid, timeout_s)
            self._signal(signal.SIGKILL)
        return self.wait()

    async def stop_async(self, timeout_s: float = 20.0) -> int | None:
        """stop() for async code."""
        if self.proc is None:
            return None
        if not self._exited.is_set():
            self.terminate()
            try:
                await asyncio.wait_for(self._exited.wait_async(), timeout_s)
            except TimeoutError:
                log.warning("%s (pid %d) did not stop within %.0f s of SIGTERM; killing it",
                            self.name, self.proc.pid, timeout_s)
                self._signal(signal.SIGKILL)
                await self._exited.wait_async()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        if self.proc is not None:
            self._signal(signal.SIGKILL)
            self.wait()

    def _join_pump(self) -> None:
        # The rest of its output: EOF comes once it (and whatever it started
        # with the same stdout) closed the pipe.
        if self._pump is not None:
            self._pump.join(10)


async def keep_restarting(child: Child, *, ready_timeout_s: float, first_delay_s: float = 0.5,
                          max_delay_s: float = 30.0) -> None:
    """Starts `child` again whenever it exits, until cancelled (cancel it before stopping the child).

    The delay doubles after each failed start, up to max_delay_s, and is
    back to first_delay_s once a start succeeds."""
    delay = first_delay_s
    while True:
        code = await child.exited()
        log.error("%s (pid %d) exited with status %s; starting it again in %.1f s", child.name, child.pid, code, delay)
        await asyncio.sleep(delay)
        try:
            child.start()
            await child.ready(ready_timeout_s)
        except (RuntimeError, OSError) as exc:
            log.error("starting %s again failed: %s", child.name, exc)
            delay = min(delay * 2, max_delay_s)
            continue
        delay = first_delay_s
        log.info("%s is back (pid %d)", child.name, child.pid)
