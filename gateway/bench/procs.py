"""Processes: whole-tree RSS from /proc, and the children bench starts.

A memory figure is the resident set of every process of the system under test
(the serve process, the inference child, every gateway worker), summed, not
one runtime's heap: that is what the machine pays.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcInfo", "RssSnapshot", "RssSampler", "OthersCpu", "Child", "tree_rss", "free_port", "wait_tcp"]

READY = re.compile(r"listening on (\S+)")


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
    rules = (("gateway serve", "serve (gateway)"), ("gateway inference", "inference"),
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


def wait_tcp(address: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with status {proc.returncode} before listening") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {address} after {timeout_s:.0f} s") from None
            time.sleep(0.05)


class Child:
    """A server bench starts: stdout scanned for its "listening on HOST:PORT"
    line, stderr to a log file, SIGTERM at the end (SIGKILL if it lingers)."""

    def __init__(self, name: str, argv: list[str], log_path: Path, *, env: dict | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.ready_line = ""
        self._ready = threading.Event()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, *, ready_timeout_s: float, address: str | None = None) -> Child:
        """Start it; wait for its ready line, or (address given) for its port to accept connections."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                         env=self.env, text=True, bufsize=1)
        finally:
            log.close()  # the child holds its own copy
        threading.Thread(target=self._pump, daemon=True).start()
        if address is not None:
            self.address = address
            wait_tcp(address, ready_timeout_s, self.proc)
            return self
        deadline = time.monotonic() + ready_timeout_s
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not become ready (status {self.proc.returncode}); "
                                   f"the end of its log {self.log_path}:\n{self.log_tail()}")
        return self

    def _pump(self) -> None:
        # Keep reading stdout so the child never blocks on a full pipe; copy it to the log.
        with self.proc.stdout as stdout, open(self.log_path, "a", encoding="utf-8") as log:
            for line in stdout:
                log.write(line)
                log.flush()
                match = READY.search(line)
                if match and not self._ready.is_set():
                    self.ready_line, self.address = line.strip(), match.group(1)
                    self._ready.set()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
