"""A private redis-server for tests, which tests may stop, kill, freeze and
restart to check how the cache behaves when Redis fails.

conftest.py (or a test module) imports the `redis_server` fixture from here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

__all__ = ["RedisServer", "redis_server", "free_port"]


def free_port() -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process on 127.0.0.1, no persistence.

    start() again after stop()/kill() brings it back on the same port (empty:
    nothing is saved). The port stays the same so clients can reconnect.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, port: int | None = None,
                 binary: str = "redis-server") -> None:  # fmt: skip
        found = shutil.which(binary)
        if found is None:
            raise RuntimeError(f"{binary} is not on PATH (Debian package: redis-server)")
        self.binary = found
        self._own_dir = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="tiergate-redis-") if directory is None else directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = self.directory / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.running:
            return self
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.directory),
                 "--daemonize", "no", "--loglevel", "warning"],  # fmt: skip
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer PING within {timeout} s: {self.log_tail()}")
            time.sleep(0.005)  # polling interval, not a readiness guess
        return self

    def ping(self, timeout: float = 0.2) -> bool:
        """True when the server answers PING now (raw socket: no client library)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful: SIGTERM (after SIGCONT, in case it is paused) and wait."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Abrupt: SIGKILL, as a crash or the OOM killer would."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections still open, nothing answers."""
        assert self.proc is not None and self.proc.poll() is None, "redis-server is not running"
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, "redis-server is not running"
        self.proc.send_signal(signal.SIGCONT)

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self._log.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Stop it and remove what it created."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh redis-server for one test; stopped afterwards whatever happened."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server
    finally:
        server.close()
