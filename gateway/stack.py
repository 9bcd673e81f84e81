"""Starts and supervises the inference service as a child process.

`tiergate serve` and `tiergate classify` (without --target) run the gateway in
their own process and the model in a child, so the gateway process never loads
torch. The child prints one "listening on HOST:PORT" line when it is ready; it
is restarted on the same port if it dies, and stopped with its parent.
"""

from __future__ import annotations

import asyncio
import sys

from gateway.children import Child, keep_restarting

__all__ = ["InferenceProcess"]

_STOP_SLACK_S = 10.0  # beyond its grace period, before a child that has not exited is killed


class InferenceProcess:
    def __init__(self, args: list[str], *, host: str = "127.0.0.1", port: int = 0, ready_timeout_s: float = 900.0,
                 grace_s: float = 10.0, log_level: str | None = None):
        self._args = args  # extra `tiergate inference` flags, e.g. ["--model", PATH]
        self.host = host
        self.port = port
        self._ready_timeout_s = ready_timeout_s
        self._grace_s = grace_s
        self._log_level = log_level  # None: the child's default (INFO)
        # A session of its own: the terminal's Ctrl-C reaches the parent only,
        # which stops this child once the gateway no longer needs it.
        self._child = Child("the inference service", self._argv(), new_session=True)
        self._keeper: asyncio.Task | None = None

    def _argv(self) -> list[str]:
        # No drain period: it is stopped after its only caller, this process's gateway, stopped.
        logging = ["--log-level", self._log_level] if self._log_level else []
        return [sys.executable, "-m", "gateway", *logging, "inference", "--host", self.host, "--port", str(self.port),
                "--exit-with-parent", "--drain-s", "0", "--grace-s", str(self._grace_s), *self._args]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> str:
        self._child.start()
        await self._child.ready(self._ready_timeout_s)
        self.port = int(self._child.address.rpartition(":")[2])
        self._child.argv = self._argv()  # a restarted child comes back on the same port
        self._keeper = asyncio.ensure_future(keep_restarting(self._child, ready_timeout_s=self._ready_timeout_s,
                                                             first_delay_s=1.0))
        return self.address

    async def stop(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
        await self._child.stop_async(self._grace_s + _STOP_SLACK_S)
