"""Runs tiergate's own commands as real child processes for tests.

Each service is started on port 0 and reports its address in its one
"listening on HOST:PORT" line; tests wait for that line (or poll health),
never a fixed sleep. Processes are gateway.children.Child underneath, the
same helper tiergate uses for its own children.

`serve`, `gateway` and `inference` get `--drain-s 0` unless the test passes
its own: a drain period only waits for load balancers, and tests that stop a
server would otherwise each wait for it (tests/test_drain.py sets its own).
They also get `--metrics-port 0` (no metrics) unless the test passes its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.children import READY, Child

__all__ = ["TiergateProcess", "wait_serving", "READY"]

_SERVERS = ("serve", "gateway", "inference")


class TiergateProcess:
    """`python -m gateway ARGS...` with start/stop/kill/restart; stdout and stderr collected in `output`."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, ready_timeout_s: float = 180.0):
        self.args = list(args)  # a test may change them before start() (another model on the same port)
        self.ready_timeout_s = ready_timeout_s
        self.output: list[str] = []
        self._child = Child(f"tiergate {self.args[0]}", [], env={**os.environ, **(env or {})},
                            output=self.output.append, stderr=subprocess.STDOUT)

    @property
    def proc(self):
        return self._child.proc

    @property
    def address(self) -> str | None:
        return self._child.address

    @property
    def ready_line(self) -> str:
        return self._child.ready_line

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def start(self) -> TiergateProcess:
        args = list(self.args)
        if args and args[0] in _SERVERS and "--drain-s" not in args:
            args += ["--drain-s", "0"]
        if args and args[0] in _SERVERS and "--metrics-port" not in args:
            args += ["--metrics-port", "0"]  # tests run side by side: none takes the fixed default port
        if self.address is not None:  # a restart keeps its port so clients reconnect to it
            args = _with_port(args, self.port)
        self._child.argv = [sys.executable, "-m", "gateway", *args]
        self._child.start()
        try:
            self._child.wait_ready(self.ready_timeout_s)
        except RuntimeError:
            self.kill()
            raise RuntimeError(f"{' '.join(self.args[:1])} did not become ready:\n{''.join(self.output[-40:])}") from None
        return self

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM without waiting: the server starts its drain."""
        self._child.terminate()

    def wait(self, timeout: float) -> int:
        """The exit status once it has exited (and its output is read); RuntimeError after timeout."""
        code = self._child.wait(timeout)
        if code is None:
            self.kill()
            raise RuntimeError(f"{self.args[0]} did not exit within {timeout} s:\n{''.join(self.output[-40:])}")
        return code

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM; the exit status. RuntimeError if it had to be killed."""
        if self.proc is None:
            return 0
        self.terminate()
        return self.wait(timeout)

    def kill(self) -> None:
        self._child.kill()

    def restart(self) -> TiergateProcess:
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
