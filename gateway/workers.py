"""N gateway worker processes on one port.

The process that runs `tiergate serve`/`tiergate gateway` is worker 0; the
others are fresh interpreters (`python -m gateway.workers`), never forked:
neither gRPC nor LMDB survives fork, so each worker creates its gRPC objects
and opens LMDB after it starts. All listen on one port with SO_REUSEPORT, so
the kernel spreads connections over them (connections, not calls: one client
channel stays with one worker). They share L2 on disk, and their counters add
up in one place (gateway.stats_board). A worker that dies is started again.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
from typing import Awaitable, Callable

from gateway.lifecycle import exit_with_parent, ready_line, until_signalled
from gateway.server import GatewayConfig, GatewayServer

__all__ = ["default_workers", "run_gateway_workers"]

log = logging.getLogger(__name__)


def default_workers(model_on_host: bool = False) -> int:
    """One worker per core (the hit path is CPU-bound in Python), at most 8;
    one per two cores where the model runs on the same host (`serve`): torch
    needs the other half, and each worker costs RSS."""
    cores = os.cpu_count() or 1
    return max(1, min(cores // 2 if model_on_host else cores, 8))


class _WorkerProcess:
    """One extra worker, a child process running this module."""

    def __init__(self, config: GatewayConfig, log_level: str) -> None:
        # The config travels pickled on the command line: the child is this same code base.
        self._payload = base64.b64encode(pickle.dumps((config, log_level))).decode()
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.workers", self._payload,
            stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        )
        try:
            await asyncio.wait_for(ready_line(self.proc, "a gateway worker"), timeout)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)  # the worker stops its server and closes L2 cleanly
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def run_gateway_workers(
    config: GatewayConfig, count: int, until: Callable[[], Awaitable[None]],
    on_ready: Callable[[GatewayServer], None], log_level: str = "INFO",
) -> None:
    """Serves with `count` workers until `until()` returns; on_ready(worker 0) once all serve."""
    stats_dir = tempfile.mkdtemp(prefix="tiergate-gateway-") if count > 1 else None
    config = dataclasses.replace(config, stats_dir=stats_dir)
    server = GatewayServer(config)
    others: list[_WorkerProcess] = []
    watcher = None
    try:
        await server.start()
        # The others bind the port worker 0 got (which matters for --port 0).
        child_config = dataclasses.replace(config, port=server.port)
        others = [_WorkerProcess(child_config, log_level) for _ in range(count - 1)]
        await asyncio.gather(*(w.start(config.connect_timeout_s + 60) for w in others))
        on_ready(server)
        watcher = asyncio.ensure_future(_restart_dead(others, config.connect_timeout_s + 60))
        await until()
    finally:
        if watcher is not None:
            watcher.cancel()
        await asyncio.gather(*(w.stop() for w in others), return_exceptions=True)
        await server.stop()
        if stats_dir:
            shutil.rmtree(stats_dir, ignore_errors=True)


async def _restart_dead(workers: list[_WorkerProcess], timeout: float) -> None:
    while True:
        await asyncio.sleep(0.5)
        for worker in workers:
            if worker.proc is not None and worker.proc.returncode is not None:
                log.error("gateway worker %d exited with status %s; starting another",
                          worker.proc.pid, worker.proc.returncode)
                try:
                    await worker.start(timeout)
                except Exception as exc:
                    log.error("restarting a gateway worker failed: %s", exc)


async def _worker_main(config: GatewayConfig) -> None:
    parent = asyncio.ensure_future(exit_with_parent(os.getppid()))
    server = GatewayServer(config)
    try:
        await server.start()
        print(f"tiergate gateway worker {os.getpid()} listening on {server.address}", flush=True)
        await until_signalled()
    finally:
        parent.cancel()
        await server.stop()


def main() -> None:
    config, log_level = pickle.loads(base64.b64decode(sys.argv[1]))
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s worker-{os.getpid()} %(name)s: %(message)s")
    try:
        asyncio.run(_worker_main(config))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
