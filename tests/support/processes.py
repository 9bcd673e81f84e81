"""Runs tiergate's own commands as real child processes for tests.

Each service is started on port 0 and reports its address in its one
"listening on HOST:PORT" line; tests wait for that line (or poll health),
never a fixed sleep.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["TiergateProcess", "wait_serving"]

READY = re.compile(r"listening on (\S+)")


class TiergateProcess:
    """`python -m gateway ARGS...` with start/stop/kill/restart."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, ready_timeout_s: float = 180.0):
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self._pump: threading.Thread | None = None
        self.address: str | None = None
        self.ready_line = ""
        self.output: list[str] = []

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def start(self) -> "TiergateProcess":
        args = list(self.args)
        if self.address is not None:  # a restart keeps its port so clients reconnect to it
            args = _with_port(args, self.port)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=self.env, text=True, bufsize=1,
        )
        deadline = time.monotonic() + self.ready_timeout_s
        found = threading.Event()

        stdout = self.proc.stdout

        def pump() -> None:  # keep reading so the child never blocks on a full pipe
            with stdout:
                for line in stdout:
                    self.output.append(line)
                    if not found.is_set() and READY.search(line):
                        self.ready_line = line.strip()
                        self.address = READY.search(line).group(1)
                        found.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        while not found.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.args[0]} did not become ready:\n{''.join(self.output[-40:])}")
        return self

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"{self.args[0]} did not stop on SIGTERM within {timeout} s")
        finally:
            self._join_pump()

    def _join_pump(self) -> None:
        if self._pump is not None:
            self._pump.join(10)  # EOF comes once the child (and its children) closed the pipe

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._join_pump()

    def restart(self) -> "TiergateProcess":
        self.stop()
        return self.start()


def _with_port(args: list[str], port: int) -> list[str]:
    out = list(args)
    if "--port" in out:
        out[out.index("--port") + 1] = str(port)
    else:
        out += ["--port", str(port)]
    return out


def wait_serving(address: str, timeout_s: float = 60.0) -> None:
    """Polls grpc.health.v1 until the server says SERVING."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout_s} s")
            time.sleep(0.05)
