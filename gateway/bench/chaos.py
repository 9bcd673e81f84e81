"""`tiergate bench --scenarios chaos`: mixed traffic against a stack that is
being broken on purpose, with every answer checked by an oracle.

Starts its own stack (the faults need to kill, freeze and damage its parts):
a private redis-server, one `tiergate inference`, and `tiergate gateway
--workers 2` with L2 in a temporary directory and L3 on that Redis. Several
asyncio clients in this process (chaos_traffic) send new and repeated texts
as Classify, ClassifyBatch and ClassifyStream with deadlines from 5 ms to
60 s. Meanwhile, on a schedule, each fault runs for a few seconds, then a
probe times how long until a new text is answered again, then a quiet
period (FAULTS below). Afterwards chaos_oracle scores every distinct
answered text alone on a fresh inference process and judges every answer.

Why a separate stack and not --target: a fault that restarts a process
needs to own it, and an oracle needs a cache that nothing else wrote into.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gateway.bench.chaos_oracle import render, score_alone, verdict
from gateway.bench.chaos_traffic import Tally, TextSource, Traffic, TrafficConfig
from gateway.bench.config import parse_duration
from gateway.bench.procs import free_port, tree_rss
from gateway.children import Child

__all__ = ["ChaosConfig", "FAULTS", "run_chaos", "run_chaos_args"]

RECOVERY_PROBE_S = (5.0, 30.0)  # after a fault, how long a new text may take to be answered again (2 slots, bounded)
HF_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # no model hub here: fail fast, never wait on one


@dataclass(frozen=True)
class ChaosConfig:
    seconds: float = 180.0                  # traffic time; restarts may stretch it a little
    model: str | None = None                # None: the default model (built on first use by `tiergate inference`)
    workers: int = 2
    out: Path = Path("bench-out")
    inference_args: tuple[str, ...] = ()    # more flags for both inference processes, e.g. ("--quantize", "off")
    traffic: TrafficConfig = TrafficConfig()
    burst_texts: int = 3000                 # the overload fault: new texts sent all at once
    faults: tuple[str, ...] = ()            # () : every fault in FAULTS, in its order
    seed: int = 20240611                    # what the faults choose (keys, pages, victims)

    def __post_init__(self) -> None:
        if not self.seconds >= 5:
            raise ValueError(f"--chaos-seconds must be >= 5 s, got {self.seconds:g}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.burst_texts < 1:
            raise ValueError(f"chaos burst_texts must be >= 1, got {self.burst_texts}")
        unknown = [f for f in self.faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown chaos fault {unknown[0]!r}; known: {', '.join(FAULTS)}")


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _start_time(pid: int) -> str:
    """When a process started (field 22 of /proc/PID/stat), "" once it is gone or a zombie: a pid with its
    start time names one process, even after the pid is reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    return "" if fields[0] == "Z" else fields[19]


class Stack:
    """The processes under test, each restartable on its own port."""

    def __init__(self, cfg: ChaosConfig, workdir: Path, logs: Path) -> None:
        self.cfg, self.logs = cfg, logs
        self._logs: list = []  # the children's log files, closed by close()
        self.env = {**os.environ, **HF_OFFLINE}
        self.l2 = workdir / "l2"
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.redis = self._child("redis", [shutil.which("redis-server") or "redis-server", "--port",
                                           str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                                           "--appendonly", "no", "--dir", str(workdir)])
        inference = [sys.executable, "-m", "gateway", "inference", "--port", "0", "--metrics-port", "0"]
        self.inference = self._child("inference", inference + (["--model", cfg.model] if cfg.model else [])
                                     + list(cfg.inference_args))
        self.gateway: Child | None = None  # argv needs the inference address
        self.seen: dict[int, str] = {}    # pid -> start time of every stack process sampled: close() ends leftovers

    def _child(self, name: str, argv: list[str]) -> Child:
        log = open(self.logs / f"{name}.log", "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed by close()
        self._logs.append(log)
        return Child(name, argv, env=self.env, output=log.write, stderr=subprocess.STDOUT, new_session=True)

    async def start(self) -> None:
        await self.start_redis()
        await self.start_inference()
        self.gateway = self._child("gateway", [
            sys.executable, "-m", "gateway", "gateway", "--port", "0", "--metrics-port", "0",
            "--workers", str(self.cfg.workers),
            "--inference", self.inference.address, "--lmdb-path", str(self.l2), "--redis-url", self.redis_url])
        await self.start_gateway()

    async def start_redis(self) -> None:
        self.redis.start()
        deadline = time.monotonic() + 10
        while not await asyncio.to_thread(self.redis_ping):
            if not self.redis.running or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING (see {self.logs / 'redis.log'})")
            await asyncio.sleep(0.02)

    def redis_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    async def start_inference(self) -> None:
        self.inference.start()
        await self.inference.ready(900)  # the first start may build the default model (about a minute)
        self._pin_port(self.inference)   # a restart comes back where the gateway expects it

    async def start_gateway(self) -> None:
        self.gateway.start()
        await self.gateway.ready(120)
        self._pin_port(self.gateway)

    @staticmethod
    def _pin_port(child: Child) -> None:
        i = child.argv.index("--port")
        child.argv[i + 1] = str(_port(child.address))

    def roots(self) -> list[int]:
        return [c.pid for c in (self.redis, self.inference, self.gateway) if c is not None and c.running]

    def gateway_workers(self) -> list[int]:
        if self.gateway is None or not self.gateway.running:
            return []
        root = self.gateway.pid  # its other processes are its workers (a multiprocessing helper is not)
        return [p.pid for p in tree_rss(root).processes if p.pid != root and not p.role.startswith("mp ")]

    def rss_mb(self) -> float:
        """RSS summed over every process of the stack (the gateway's workers included). Reads /proc: call it
        off the event loop (asyncio.to_thread) while traffic runs, or its latencies include the scan."""
        total = 0.0
        for root in self.roots():
            snap = tree_rss(root)
            for p in snap.processes:
                self.seen.setdefault(p.pid, _start_time(p.pid))
            total += snap.total_mb
        return round(total, 1)

    async def close(self) -> None:
        await asyncio.to_thread(self.rss_mb)  # one last look at which processes exist
        if self.redis.running:
            self.redis.proc.send_signal(signal.SIGCONT)  # a frozen Redis cannot act on SIGTERM
        for child in (self.gateway, self.inference, self.redis):
            if child is not None and child.proc is not None:
                await child.stop_async(timeout_s=30)
                await asyncio.to_thread(child.wait, 10)  # its output is all in the log before the log closes
        for pid, started in self.seen.items():  # e.g. a worker orphaned when its gateway was killed
            if started and _start_time(pid) == started:  # the same process, not a new one with a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for log in self._logs:
            log.close()


class Run:
    """One chaos run: the stack, the traffic and what the faults noted."""

    def __init__(self, cfg: ChaosConfig, stack: Stack, traffic: Traffic) -> None:
        self.cfg, self.stack, self.traffic = cfg, stack, traffic
        self.hold_s = 1.0  # how long each fault lasts: set by the schedule from the time there is
        self.rng = random.Random(cfg.seed + 7)
        self.broken: list[str] = []  # product failures the counts do not show (a process that did not come back)
        self.faults: list[dict] = []
        self.rss: dict[str, float] = {}


# -- the faults: each injects, holds for run.hold_s, recovers; returns what happened -----------------------------

async def redis_kill(run: Run) -> str:
    await asyncio.to_thread(run.stack.redis.kill)
    await asyncio.sleep(run.hold_s)
    await run.stack.start_redis()
    return "redis-server SIGKILLed, restarted empty on the same port"


async def redis_freeze(run: Run) -> str:
    run.stack.redis.proc.send_signal(signal.SIGSTOP)
    await asyncio.sleep(run.hold_s)
    run.stack.redis.proc.send_signal(signal.SIGCONT)
    return "redis-server SIGSTOPped (connections open, nothing answers), then SIGCONT"


def _garbage(url: str, rng: random.Random) -> Counter:
    """Every tiergate key in Redis gets a value it must not serve: random bytes,
    empty, truncated, bit-flipped, huge, another key's genuine value (right for
    another text), or out-of-range values in plain formats."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        keys = list(client.scan_iter(match=b"tg:*", count=1000))
        genuine = [v for v in client.mget(keys) if v] if keys else []
        kinds = Counter()
        for key in keys:
            kind = rng.choice(("random", "empty", "truncated", "flipped", "huge", "swapped", "plain"))
            value = rng.choice(genuine) if genuine else os.urandom(24)
            if kind == "random":
                value = os.urandom(rng.randint(1, 600))
            elif kind == "empty":
                value = b""
            elif kind == "truncated":
                value = value[: len(value) // 2]
            elif kind == "flipped":
                i = rng.randrange(len(value))
                value = value[:i] + bytes([value[i] ^ (1 << rng.randrange(8))]) + value[i + 1:]
            elif kind == "huge":
                value = b"x" * 1_000_000 if kinds["huge"] < 20 else os.urandom(700)
            elif kind == "plain":
                value = rng.choice((b'{"label": "positive", "score": 7.5}', b"positive|nan", b"NEUTRAL:0.5",
                                    b"negative\x00inf", b"age!:1.1e21", b"positive:-1"))
            client.set(key, value, keepttl=True)
            kinds[kind] += 1
        return kinds
    finally:
        client.close()


async def redis_garbage(run: Run) -> str:
    kinds = await asyncio.to_thread(_garbage, run.stack.redis_url, run.rng)
    await asyncio.sleep(run.hold_s)
    return f"{sum(kinds.values())} tg:* keys overwritten ({', '.join(f'{k} {n}' for k, n in kinds.items())})"


async def inference_kill(run: Run) -> str:
    await asyncio.to_thread(run.stack.inference.kill)
    await asyncio.sleep(run.hold_s)
    t0 = time.monotonic()
    await run.stack.start_inference()
    return f"inference SIGKILLed, restarted on the same port (ready after {time.monotonic() - t0:.1f} s)"


async def worker_kill(run: Run) -> str:
    before = await asyncio.to_thread(run.stack.gateway_workers)
    if not before:
        return "no extra gateway worker to kill (--workers 1)"
    victim = run.rng.choice(before)
    os.kill(victim, signal.SIGKILL)
    await asyncio.sleep(run.hold_s)
    after = await asyncio.to_thread(run.stack.gateway_workers)
    if not run.stack.gateway.running:
        run.broken.append(f"the gateway exited (status {run.stack.gateway.returncode}) after worker {victim} "
                          "was killed")
        await run.stack.start_gateway()
        return f"worker {victim} SIGKILLed: the whole gateway died; restarted by chaos"
    new = sorted(set(after) - set(before))
    return (f"worker {victim} SIGKILLed; {run.hold_s:.1f} s later the gateway has workers {after}"
            + (f" (restarted as {new})" if new else " (not restarted)"))


def _damage_pages(path: Path, rng: random.Random) -> str:
    size, page = path.stat().st_size, 4096
    pages = size // page
    if pages <= 2:
        return f"{path.name} has no data pages ({size} bytes)"
    with open(path, "r+b") as fh:
        for _ in range(min(4, pages - 2)):  # whole random data pages (never the two meta pages)
            fh.seek(rng.randrange(2, pages) * page)
            fh.write(os.urandom(page))
        for _ in range(64):  # and bit rot: single bytes anywhere after the meta pages
            offset = rng.randrange(2 * page, size)
            fh.seek(offset)
            byte = fh.read(1)[0]
            fh.seek(offset)
            fh.write(bytes([byte ^ rng.randrange(1, 256)]))
    return f"{path.name} ({size} bytes): 4 data pages overwritten with random bytes, 64 bytes flipped"


def _truncate(path: Path, rng: random.Random) -> str:
    size = path.stat().st_size
    os.truncate(path, size // 2)
    return f"{path.name} truncated from {size} to {size // 2} bytes"


async def _damage_l2(run: Run, damage) -> str:
    stack = run.stack
    workers = await asyncio.to_thread(stack.gateway_workers)
    code = await stack.gateway.stop_async(timeout_s=60)  # clean: SIGTERM, so L2's own shutdown marker says clean
    left = [pid for pid in workers if _start_time(pid)]
    if left:
        run.broken.append(f"gateway workers {left} still ran after the gateway stopped cleanly")
    files = sorted(stack.l2.rglob("data.mdb"))
    notes = [await asyncio.to_thread(damage, f, run.rng) for f in files] or [f"no data.mdb under {stack.l2}"]
    try:
        await stack.start_gateway()
        came_back = "the gateway started again on the same port"
    except RuntimeError as exc:
        last = [line for line in str(exc).splitlines() if line.strip()][-3:]
        run.broken.append(f"the gateway did not start on a damaged L2: {' | '.join(last)}")
        shutil.rmtree(stack.l2, ignore_errors=True)  # so the rest of the run still has a gateway
        await stack.start_gateway()
        came_back = "the gateway did NOT start on it; chaos removed L2 and started it"
    return (f"gateway stopped (status {code}{', workers left: ' + str(left) if left else ''}); "
            f"{'; '.join(notes)}; {came_back}")


async def l2_damage(run: Run) -> str:
    return await _damage_l2(run, _damage_pages)


async def l2_truncate(run: Run) -> str:
    return await _damage_l2(run, _truncate)


async def overload(run: Run) -> str:
    traffic, n = run.traffic, run.cfg.burst_texts
    texts = [traffic.texts.fresh(run.rng) for _ in range(n)]
    unary, batches = texts[: 2 * n // 3], texts[2 * n // 3:]
    calls = [traffic.call(traffic.stubs[i % len(traffic.stubs)], "unary", [t], traffic.deadline(run.rng))
             for i, t in enumerate(unary)]
    calls += [traffic.call(traffic.stubs[i % len(traffic.stubs)], "batch", batches[i:i + 20],
                           traffic.deadline(run.rng)) for i in range(0, len(batches), 20)]
    answered = sum(await asyncio.gather(*calls))
    return f"{n} new texts at once ({len(unary)} Classify + {math.ceil(len(batches) / 20)} ClassifyBatch of 20): " \
           f"{answered} answered"


# Order matters: garbage goes into a full Redis after it was killed and
# refilled, and stays there for the L2 faults, after which L3 is read again.
FAULTS = {
    "redis-freeze": redis_freeze, "redis-kill": redis_kill, "redis-garbage": redis_garbage,
    "inference-kill": inference_kill, "worker-kill": worker_kill, "l2-damage": l2_damage,
    "l2-truncate": l2_truncate, "overload": overload,
}


async def _recovered(run: Run, limit_s: float) -> float | None:
    """Seconds until a new text is answered again (None: not within limit_s)."""
    t0, rng = time.monotonic(), random.Random(run.rng.random())
    while time.monotonic() - t0 < limit_s:
        if await run.traffic.call(run.traffic.stubs[0], "unary", [run.traffic.texts.fresh(rng)], 2.0):
            return round(time.monotonic() - t0, 2)
        await asyncio.sleep(0.1)
    return None


async def _schedule(run: Run) -> None:
    cfg, traffic = run.cfg, run.traffic
    names = cfg.faults or tuple(FAULTS)
    t0 = time.monotonic()
    warm = max(3.0, 0.12 * cfg.seconds)  # the "before" window: p99 without faults
    slot = (cfg.seconds - warm) / len(names)
    run.hold_s = min(8.0, max(0.5, 0.35 * slot))
    probe_s = min(RECOVERY_PROBE_S[1], max(RECOVERY_PROBE_S[0], 2 * slot))
    await asyncio.sleep(warm)
    for i, name in enumerate(names):
        traffic.phase, start = name, time.monotonic()
        print(f"  {name} at {start - t0:.1f} s", file=sys.stderr, flush=True)
        try:
            note = await FAULTS[name](run)
        except Exception as exc:  # noqa: BLE001 - a fault that cannot recover is a finding, not a crash of chaos
            note = f"failed: {exc!r}"
            run.broken.append(f"{name}: {exc}")
        took = time.monotonic() - start
        traffic.phase = f"after {name}"
        recovered = await _recovered(run, probe_s)
        if recovered is None:
            run.broken.append(f"after {name}: no new text was answered within {probe_s:g} s")
        run.faults.append({"name": name, "at_s": round(start - t0, 1), "seconds": round(took, 1), "note": note,
                           "new_text_answered_after_s": recovered})
        run.rss[f"after {name}"] = await asyncio.to_thread(run.stack.rss_mb)
        print(f"    {took:.1f} s: {note}; a new text answered {recovered} s later", file=sys.stderr, flush=True)
        await asyncio.sleep(max(1.0, t0 + warm + (i + 1) * slot - time.monotonic()))


async def _run(cfg: ChaosConfig, logs: Path, workdir: Path) -> dict:
    tally, stack, traffic = Tally(), Stack(cfg, workdir, logs), None
    seconds, t = {}, time.monotonic()  # where the wall time went

    def lap(name: str) -> None:
        nonlocal t
        seconds[name], t = round(time.monotonic() - t, 1), time.monotonic()

    try:
        await stack.start()
        lap("stack_start")
        print(f"chaos: {stack.gateway.ready_line}", file=sys.stderr, flush=True)
        traffic = Traffic(cfg.traffic, stack.gateway.address, tally, TextSource(cfg.traffic, secrets.token_hex(3)))
        run = Run(cfg, stack, traffic)
        run.rss["start"] = await asyncio.to_thread(stack.rss_mb)
        await traffic.prime()
        lap("prime")
        clients = [asyncio.ensure_future(traffic.client(i)) for i in range(cfg.traffic.clients)]
        try:
            await _schedule(run)
        finally:
            lap("traffic")
            traffic.phase = "end"
            traffic.stop.set()
            await asyncio.gather(*clients)  # each call is bounded by its deadline + chaos_traffic.HANG_GRACE_S
            lap("last_calls")
        run.rss["end"] = await asyncio.to_thread(stack.rss_mb)
        if not stack.gateway.running or not stack.inference.running:
            run.broken.append("at the end: " + ", ".join(f"{c.name} exited (status {c.returncode})"
                                                         for c in (stack.gateway, stack.inference) if not c.running))
    finally:
        if traffic is not None:
            await traffic.close()
        await stack.close()
        lap("stack_stop")
    # The oracle runs once the stack is gone: it has the cores to itself and nothing it does shows in the stack's figures.
    truth = await score_alone(tally.texts(), model=cfg.model, extra_args=cfg.inference_args,
                              log=logs / "oracle.log", env=stack.env)
    lap("oracle")
    result = verdict(tally, truth, faults=run.faults, broken=run.broken, rss=run.rss, traffic_s=seconds["traffic"],
                     logs=logs)
    result["seconds"] = seconds
    result["stack_pids"] = sorted(stack.seen)  # all stopped by now: a test can check that none is left
    return result


def run_chaos(cfg: ChaosConfig) -> int:
    """Runs chaos; prints one JSON line and a table on stdout; 0 on PASS, 1 on FAIL."""
    logs = cfg.out / "chaos"
    logs.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tiergate-chaos-"))
    try:
        result = asyncio.run(_run(cfg, logs, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(render(result, logs / "chaos.json"), flush=True)
    return 0 if result["verdict"] == "PASS" else 1


def run_chaos_args(args) -> int:
    """From `tiergate bench` flags: --chaos-seconds, --model, --workers, --out, --serve-args (inference flags)."""
    try:
        cfg = ChaosConfig(seconds=parse_duration(args.chaos_seconds), model=args.model, workers=args.workers or 2,
                          out=Path(args.out), inference_args=tuple(shlex.split(args.serve_args)),
                          traffic=TrafficConfig(connections=2 * (args.workers or 2)))
    except ValueError as exc:
        print(f"tiergate bench: error: {exc}", file=sys.stderr)
        return 2
    return run_chaos(cfg)
