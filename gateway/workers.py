"""N gateway worker processes on one port.

The process that runs `tiergate serve`/`tiergate gateway` is worker 0; the
others are fresh interpreters (`python -m gateway.workers`), never forked:
neither gRPC nor LMDB survives fork, so each worker creates its gRPC objects
and opens LMDB after it starts. All listen on one port with SO_REUSEPORT, so
the kernel spreads connections over them (connections, not calls: one client
channel stays with one worker). They share L2 on disk, and their counters add
up in one place (gateway.stats_board). A worker that dies is started again.

A worker's config (Redis password and cache secret included) travels pickled
on its stdin, never in argv: any local user can read /proc/PID/cmdline.

On SIGHUP (certificates or tokens rotated) worker 0 reloads and passes
SIGHUP on to the others, each of which reads the files again itself.

On SIGINT/SIGTERM worker 0 passes SIGTERM on to the others at once, so every
worker's health says NOT_SERVING together (a health check's connection may
land on any of them); each drains and stops by itself, and worker 0 waits
until they have exited.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
from typing import Callable

from gateway import event_loop
from gateway.children import Child, keep_restarting
from gateway.lifecycle import DrainConfig, StopSignals, drain_and_stop, exit_with_parent, reload_on_sighup
from gateway.server import GatewayConfig, GatewayServer
from protos.logs import configure_logging

__all__ = ["default_workers", "run_gateway_workers"]

log = logging.getLogger(__name__)

_STOP_SLACK_S = 10.0  # beyond drain + grace, before a worker that has not exited is killed


def default_workers(model_on_host: bool = False) -> int:
    """One worker per core (the hit path is CPU-bound in Python), at most 8;
    one per two cores where the model runs on the same host (`serve`): torch
    needs the other half, and each worker costs RSS."""
    cores = os.cpu_count() or 1
    return max(1, min(cores // 2 if model_on_host else cores, 8))


def _worker(config: GatewayConfig, drain: DrainConfig, log_level: str) -> Child:
    # A session of its own: the terminal's Ctrl-C reaches worker 0 only, which
    # passes one SIGTERM on (a second signal would cut the worker's drain short).
    return Child("gateway worker", [sys.executable, "-m", "gateway.workers"],
                 stdin=pickle.dumps((config, drain, log_level)), new_session=True)


async def run_gateway_workers(
    config: GatewayConfig, count: int, on_ready: Callable[[GatewayServer], None], *,
    drain: DrainConfig = DrainConfig(), log_level: str = "INFO",
) -> None:
    """Serves with `count` workers until SIGINT/SIGTERM, then drains and stops
    them all; on_ready(worker 0) once all serve."""
    stats_dir = tempfile.mkdtemp(prefix="tiergate-gateway-") if count > 1 else None
    config = dataclasses.replace(config, stats_dir=stats_dir)
    server = GatewayServer(config)
    start_timeout = config.connect_timeout_s + 60
    others: list[Child] = []
    keepers: list[asyncio.Task] = []
    if server.reloadable:
        reload_on_sighup(lambda: _reload_all(server, others))
    try:
        await server.start()
        signals = StopSignals()
        # The others bind the port worker 0 got (which matters for --port 0).
        # Only worker 0 serves /metrics; the others count for it (gateway.metrics).
        others = [_worker(dataclasses.replace(config, port=server.port, metrics_port=None,
                                              count_calls=config.metrics_port is not None), drain, log_level)
                  for _ in range(count - 1)]
        for worker in others:
            worker.start()
        await asyncio.gather(*(w.ready(start_timeout) for w in others))
        on_ready(server)
        keepers = [asyncio.ensure_future(keep_restarting(w, ready_timeout_s=start_timeout)) for w in others]
        await signals.wait()
        for keeper in keepers:
            keeper.cancel()
        for worker in others:
            worker.terminate()
        await drain_and_stop(server, drain, signals)
    finally:
        for keeper in keepers:
            keeper.cancel()
        results = await asyncio.gather(*(w.stop_async(drain.total_s + _STOP_SLACK_S) for w in others),
                                       server.stop(0), return_exceptions=True)  # stop(0): a no-op after the drain
        for result in results:
            if isinstance(result, Exception):
                log.error("stopping the gateway workers: %s", result)
        if stats_dir:
            shutil.rmtree(stats_dir, ignore_errors=True)


def _reload_all(server: GatewayServer, others: list[Child]) -> None:
    # Every worker reads the files itself (they hold their own credentials).
    # Only ready ones are told: one still starting may not handle SIGHUP yet
    # (its default would kill it), and it reads the files as it starts.
    server.reload()
    for worker in others:
        if worker.ready_now:
            worker.send_signal(signal.SIGHUP)


async def _worker_main(config: GatewayConfig, drain: DrainConfig) -> None:
    parent = asyncio.ensure_future(exit_with_parent(os.getppid()))
    server = GatewayServer(config)
    if server.reloadable:
        reload_on_sighup(server.reload)  # from worker 0, which got it first
    try:
        await server.start()
        signals = StopSignals()
        print(f"tiergate gateway worker {os.getpid()} listening on {server.address}", flush=True)
        await signals.wait()
        await drain_and_stop(server, drain, signals)
    finally:
        parent.cancel()
        await server.stop(0)


def main() -> None:
    config, drain, log_level = pickle.loads(sys.stdin.buffer.read())  # from worker 0, see _worker
    configure_logging(log_level, tag=f"worker-{os.getpid()}")  # the format: $TIERGATE_LOG_FORMAT, set by the CLI
    try:
        event_loop.run(_worker_main(config, drain))  # the loop worker 0 runs: $TIERGATE_EVENT_LOOP is inherited
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
