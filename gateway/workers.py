"""N gateway worker processes on one port.

Workers are started with the `spawn` method and build everything (gRPC
objects, the LMDB environment) after they start: neither gRPC nor LMDB
survives fork. They listen on one port with SO_REUSEPORT, so the kernel
spreads connections over them (connections, not calls: one client channel
stays with one worker). They share L2 on disk, and their counters add up in
one place (gateway.stats_board). A worker that dies is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import tempfile

from gateway.server import GatewayConfig

__all__ = ["default_workers", "run_workers"]

log = logging.getLogger(__name__)


def default_workers() -> int:
    """One worker per core (the hit path is CPU-bound in Python), at most 8."""
    return max(1, min(os.cpu_count() or 1, 8))


def _worker_main(config: GatewayConfig, ready: multiprocessing.Queue, log_level: str) -> None:
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s worker-{os.getpid()} %(name)s: %(message)s")
    asyncio.run(_serve_one(config, ready))


async def _serve_one(config: GatewayConfig, ready: multiprocessing.Queue) -> None:
    from gateway.server import GatewayServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = GatewayServer(config)
    try:
        await server.start()
    except Exception as exc:
        ready.put(("error", os.getpid(), str(exc)))
        await server.stop()
        return
    ready.put(("ready", os.getpid(), server.address))
    try:
        await stop.wait()
    finally:
        await server.stop()


@contextlib.contextmanager
def _reserved_port(host: str, port: int):
    """A concrete port for port 0, held (bound, not listening) until the workers are up."""
    if port != 0:
        yield port
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, 0))
        yield sock.getsockname()[1]


class _Workers:
    def __init__(self, config: GatewayConfig, count: int, log_level: str) -> None:
        self.config = config
        self.count = count
        self.log_level = log_level
        self._ctx = multiprocessing.get_context("spawn")
        self.ready = self._ctx.Queue()
        self.procs: list[multiprocessing.Process] = []

    def spawn(self) -> multiprocessing.Process:
        proc = self._ctx.Process(target=_worker_main, args=(self.config, self.ready, self.log_level),
                                 name="tiergate-gateway-worker", daemon=False)
        proc.start()
        return proc

    async def wait_ready(self, how_many: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = 0
        while seen < how_many:
            left = deadline - loop.time()
            if left <= 0:
                raise RuntimeError(f"only {seen} of {how_many} gateway workers became ready within {timeout:.0f} s")
            try:
                kind, pid, detail = await loop.run_in_executor(None, self.ready.get, True, min(left, 1.0))
            except queue.Empty:
                continue
            if kind == "error":
                raise RuntimeError(f"gateway worker {pid} failed to start: {detail}")
            seen += 1

    def stop_all(self, timeout: float = 10.0) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: the worker stops its server and closes L2 cleanly
        for proc in self.procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.ready.close()
        self.ready.join_thread()


async def run_workers(config: GatewayConfig, count: int, until, on_ready, log_level: str = "INFO") -> None:
    """Runs `count` workers until the awaitable factory `until()` returns; calls on_ready(address) once all serve."""
    stats_dir = tempfile.mkdtemp(prefix="tiergate-gateway-")
    workers = None
    try:
        with _reserved_port(config.host, config.port) as port:
            config = dataclasses.replace(config, port=port, stats_dir=stats_dir)
            workers = _Workers(config, count, log_level)
            workers.procs = [workers.spawn() for _ in range(count)]
            await workers.wait_ready(count, config.connect_timeout_s + 60)
        on_ready(f"{config.host}:{port}")
        stop = asyncio.ensure_future(until())
        while not stop.done():
            await asyncio.wait([stop], timeout=0.5)
            for i, proc in enumerate(workers.procs):
                if proc.exitcode is not None and not stop.done():
                    log.error("gateway worker %s exited with status %s; starting another", proc.pid, proc.exitcode)
                    workers.procs[i] = workers.spawn()
    finally:
        if workers is not None:
            await asyncio.get_running_loop().run_in_executor(None, workers.stop_all)
        shutil.rmtree(stats_dir, ignore_errors=True)
