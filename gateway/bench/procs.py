"""Processes: whole-tree RSS from /proc, and starting the servers bench talks to.

A memory figure is the resident set of every process of the system under test
(the serve process, the inference child, every gateway worker), summed, not
one runtime's heap: that is what the machine pays.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.children import Child

__all__ = ["ProcInfo", "RssSnapshot", "RssSampler", "OthersCpu", "tree_rss", "free_port", "start_server"]


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    role: str
    rss_mb: float
    cmdline: str


@dataclass(frozen=True)
class RssSnapshot:
    total_mb: float
    processes: tuple[ProcInfo, ...]

    def as_dict(self) -> dict:
        return {"total_mb": round(self.total_mb, 1),
                "processes": [{"pid": p.pid, "role": p.role, "rss_mb": round(p.rss_mb, 1), "cmdline": p.cmdline}
                              for p in self.processes]}


def _ppids() -> dict[int, int]:
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # comm (field 2) is in parentheses and may hold spaces: split after the last ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process exited while we looked
        out[int(stat.parent.name)] = int(fields[1])
    return out


def descendants(root: int) -> list[int]:
    """root and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppids().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None  # gone, or a zombie (no VmRSS line)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def role_of(cmdline: str) -> str:
    """A short name for what a process is, from its command line."""
    rules = (("gateway serve", "serve (gateway)"), ("gateway inference", "inference"), (" inference --uds", "inference"),
             ("gateway gateway", "gateway"), ("gateway.workers", "gateway worker"),
             ("resource_tracker", "mp resource tracker"), ("forkserver", "mp forkserver"),
             ("gateway.bench.trivial_server", "trivial grpc.aio"), ("inference.pipeline_baseline", "pipeline"))
    for needle, role in rules:
        if needle in cmdline:
            return role
    first = cmdline.split(" ", 1)[0]
    return os.path.basename(first) or "?"


def tree_rss(root: int) -> RssSnapshot:
    procs = []
    for pid in descendants(root):
        kb = _status_kb(pid, "VmRSS")
        if kb is None:
            continue
        cmd = _cmdline(pid)
        procs.append(ProcInfo(pid=pid, role=role_of(cmd), rss_mb=kb / 1024, cmdline=cmd))
    return RssSnapshot(total_mb=sum(p.rss_mb for p in procs), processes=tuple(procs))


class RssSampler:
    """Samples a tree's summed RSS in a thread while a scenario runs: the figure
    reported is the one at the end, the peak is kept too (a short spike, e.g. a
    batch of misses, is gone by the end)."""

    def __init__(self, root: int | None, interval_s: float = 0.5) -> None:
        self.root = root
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        if self.root is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, tree_rss(self.root).total_mb)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def end(self) -> RssSnapshot | None:
        if self.root is None:
            return None
        snap = tree_rss(self.root)
        self.peak_mb = max(self.peak_mb, snap.total_mb)
        return snap


def _tree_ticks(root: int) -> dict[int, int]:
    """CPU ticks (user + system, with reaped children) of root and every process under it."""
    out = {}
    for pid in descendants(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[pid] = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return out


def _busy_ticks() -> int:
    """user + nice + system ticks of the whole machine (irq, softirq and steal left out)."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = fh.readline().split()
    return int(fields[1]) + int(fields[2]) + int(fields[3])


class OthersCpu:
    """How many cores the rest of the machine used while bench measured: a
    shared machine's other work shows up in every figure, and this says how
    much of it there was. The machine's busy time minus that of bench's own
    process tree (the stack, the load generators, the baselines: those that
    exit are counted through the parent that reaps them)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.t0 = time.monotonic()
        self.busy0 = _busy_ticks()
        self.tree0 = _tree_ticks(root)

    def cores(self) -> float:
        tree = _tree_ticks(self.root)
        busy = _busy_ticks() - self.busy0
        elapsed = time.monotonic() - self.t0
        mine = sum(max(0, n - self.tree0.get(pid, 0)) for pid, n in tree.items())
        return max(0.0, (busy - mine) / os.sysconf("SC_CLK_TCK") / elapsed) if elapsed > 0 else 0.0


def free_port(host: str = "127.0.0.1") -> int:
    # For servers that cannot listen on port 0 and tell us (gostub). A small race, fine for a benchmark.
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_tcp(address: str, timeout_s: float, child: Child) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError:
            if not child.running:
                raise RuntimeError(f"{child.name} exited with status {child.returncode} before listening") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {address} after {timeout_s:.0f} s") from None
            time.sleep(0.05)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_server(name: str, argv: list[str], log_path: Path, *, ready_timeout_s: float,
                 address: str | None = None) -> Child:
    """A server bench starts, its stdout and stderr going to log_path: ready
    once it prints its "listening on HOST:PORT" line, or (address given, for
    servers that print none) once that port accepts connections. Stop it with
    child.stop() (SIGTERM, SIGKILL if it lingers)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def to_log(line: str) -> None:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(line)

    with open(log_path, "ab") as log:
        child = Child(name, argv, output=to_log, stderr=log).start()  # the child holds its own copy of the file
    try:
        if address is None:
            child.wait_ready(ready_timeout_s)
        else:
            child.address = address
            _wait_tcp(address, ready_timeout_s, child)
    except RuntimeError as exc:
        child.stop()
        raise RuntimeError(f"{exc}; the end of its log {log_path}:\n{_tail(log_path)}") from None
    return child
