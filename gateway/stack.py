"""Starts and supervises the inference service as a child process.

`tiergate serve` and `tiergate classify` (without --target) run the gateway in
their own process and the model in a child, so the gateway process never loads
the model's runtime. The child listens on a Unix socket in a directory of its
own, mode 0700, so no other user's process can reach it (no TCP port is
open); it prints one "listening on unix:PATH" line when it is ready, is
restarted on the same socket if it dies, and is stopped with its parent.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile

from gateway.children import Child, keep_restarting

__all__ = ["InferenceProcess"]

_STOP_SLACK_S = 10.0  # beyond its grace period, before a child that has not exited is killed


class InferenceProcess:
    def __init__(self, args: list[str], *, ready_timeout_s: float = 900.0, grace_s: float = 10.0,
                 log_level: str | None = None):
        self._args = args  # extra `tiergate inference` flags, e.g. ["--model", PATH]
        self._ready_timeout_s = ready_timeout_s
        self._grace_s = grace_s
        self._log_level = log_level  # None: the child's default (INFO)
        # mkdtemp makes the directory 0700: only this user can connect to the socket.
        self._dir = tempfile.mkdtemp(prefix="tiergate-inference-")
        self.socket = os.path.join(self._dir, "inference.sock")
        # A session of its own: the terminal's Ctrl-C reaches the parent only,
        # which stops this child once the gateway no longer needs it.
        self._child = Child("the inference service", self._argv(), new_session=True)
        self._keeper: asyncio.Task | None = None

    def _argv(self) -> list[str]:
        # No drain period: it is stopped after its only caller, this process's gateway, stopped.
        logging = ["--log-level", self._log_level] if self._log_level else []
        return [sys.executable, "-m", "gateway", *logging, "inference", "--uds", self.socket,
                "--exit-with-parent", "--drain-s", "0", "--grace-s", str(self._grace_s),
                # Its metrics come through its gateway's scrape (gateway.metrics): no port of its own.
                "--metrics-port", "0", *self._args]

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    async def start(self) -> str:
        self._child.start()
        await self._child.ready(self._ready_timeout_s)
        self._keeper = asyncio.ensure_future(keep_restarting(self._child, ready_timeout_s=self._ready_timeout_s,
                                                             first_delay_s=1.0))
        return self.address

    async def stop(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
        try:
            await self._child.stop_async(self._grace_s + _STOP_SLACK_S)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
