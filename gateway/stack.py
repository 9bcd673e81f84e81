"""Starts and supervises the inference service as a child process.

`tiergate serve` and `tiergate classify` (without --target) run the gateway in
their own process and the model in a child, so the gateway process never loads
torch. The child prints one "listening on HOST:PORT" line when it is ready; it
is restarted on the same port if it dies, and stopped with its parent.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from gateway.lifecycle import READY_PATTERN, ready_line

__all__ = ["InferenceProcess"]

log = logging.getLogger(__name__)


class InferenceProcess:
    def __init__(self, args: list[str], *, host: str = "127.0.0.1", port: int = 0, ready_timeout_s: float = 900.0):
        self._args = args  # extra `tiergate inference` flags, e.g. ["--model", PATH]
        self.host = host
        self.port = port
        self._ready_timeout_s = ready_timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task | None = None
        self._stopping = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> str:
        await self._spawn()
        self._watch = asyncio.get_running_loop().create_task(self._restart_when_dead())
        return self.address

    async def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "gateway", "inference", "--host", self.host, "--port", str(self.port),
               "--exit-with-parent", *self._args]
        self._proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
        try:
            line = await asyncio.wait_for(ready_line(self._proc, "the inference service"), self._ready_timeout_s)
        except BaseException:
            await self._terminate()
            raise
        host, _, port = READY_PATTERN.search(line).group(1).rpartition(":")
        self.port = int(port)  # keep it: a restarted child comes back on the same port

    async def _restart_when_dead(self) -> None:
        backoff = 1.0
        while not self._stopping:
            code = await self._proc.wait()
            if self._stopping:
                return
            log.error("the inference service exited with status %s; restarting it in %.0f s", code, backoff)
            await asyncio.sleep(backoff)
            try:
                await self._spawn()
                backoff = 1.0
            except Exception as exc:
                log.error("restarting the inference service failed: %s", exc)
                backoff = min(backoff * 2, 30.0)

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        await self._terminate()
