"""Load generators behind one interface: ghz, grpcload, or the built-in Python one.

Each runs as a child process and reports the same fields (LoadResult), so a
scenario does not care which one ran. Preference: ghz (the usual gRPC tool)
when it is on PATH, else grpcload (../shared/tools), else the Python
generator (gateway.bench.pyload), which shares the machine's cores with the
server it measures.

What each can do: ghz runs closed-loop unary and batch calls (its bidi mode
sends a whole array per stream and times the stream, not each message, and
its --rps pacing times from the actual send), so streams and open-loop runs go
to grpcload or the Python generator, which time each message and measure open
loop from the scheduled send time.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["LoadSpec", "LoadResult", "LoadGenerator", "Tools", "find_tools", "generators", "pick"]

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_FILE = REPO_ROOT / "protos" / "classifier.proto"


@dataclass(frozen=True)
class LoadSpec:
    method: str                       # "/tiergate.v1.Classifier/Classify"
    texts_file: Path                  # one text per line, sent in field 1
    batch: int = 1                    # texts per request (repeated field 1)
    unique: bool = False              # request j's texts get " #<j>": all new
    stream: bool = False              # one bidi stream per worker, ping-pong
    concurrency: int = 50
    connections: int = 4
    duration_s: float | None = 10.0   # run this long, or
    requests: int | None = None       # send this many
    rps: float | None = None          # open loop at this offered rate; None: closed loop
    timeout_s: float | None = None    # per-call deadline; None: the generator's own (20 s for both of ours)

    def replace(self, **changes) -> LoadSpec:
        return LoadSpec(**{**asdict(self), **changes})


@dataclass
class LoadResult:
    generator: str
    ok: int
    errors: dict[str, int]
    seconds: float
    calls_per_s: float
    texts_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    offered_rps: float | None
    argv: list[str] = field(default_factory=list)
    # Only where the generator reports them (the Python one does):
    error_latency_ms: dict[str, dict[str, float]] | None = None  # code -> p50/p99/max, from the actual send
    hung: int | None = None           # calls that hit the client deadline or never finished
    sent: int | None = None           # calls started
    sent_per_s: float | None = None   # calls started per second of the sending window (open loop: vs offered)
    send_lag_ms: dict[str, float] | None = None  # actual send minus scheduled send: p50/p99/max

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def status_name(code: str) -> str:
    """'DeadlineExceeded' (Go) or 'StatusCode.UNAVAILABLE' -> 'DEADLINE_EXCEEDED', 'UNAVAILABLE'."""
    code = code.rsplit(".", 1)[-1]
    return code if code.isupper() else re.sub(r"(?<!^)(?=[A-Z])", "_", code).upper()


def _go_duration(seconds: float) -> str:
    return f"{max(1, int(round(seconds * 1000)))}ms"


class LoadGenerator:
    name = "?"
    exact_open_loop = True  # measures latency from the scheduled send time

    def __init__(self, path: str) -> None:
        self.path = path

    def supports(self, spec: LoadSpec) -> bool:
        return True

    def argv(self, spec: LoadSpec, address: str, workdir: Path) -> list[str]:
        raise NotImplementedError

    def parse(self, stdout: str, spec: LoadSpec) -> LoadResult:
        raise NotImplementedError

    def run(self, spec: LoadSpec, address: str, workdir: Path) -> LoadResult:
        argv = self.argv(spec, address, workdir)
        # Generous: a closed loop finishes its calls in flight after the duration, each up to its deadline.
        limit = (spec.duration_s or 0) + 180 if spec.requests is None else 1800
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"{self.name} failed (status {proc.returncode}): {' '.join(argv)}\n"
                               f"{(proc.stderr or proc.stdout)[-2000:]}")
        result = self.parse(proc.stdout, spec)
        result.argv = argv
        return result


class Grpcload(LoadGenerator):
    """../shared/tools/grpcload, or anything that speaks its flags and JSON line (pyload)."""

    name = "grpcload"

    def command(self) -> list[str]:
        return [self.path]

    def argv(self, spec: LoadSpec, address: str, workdir: Path) -> list[str]:
        argv = [*self.command(), "-addr", address, "-call", spec.method, "-texts", str(spec.texts_file),
                "-c", str(spec.concurrency), "-connections", str(spec.connections), "-batch", str(spec.batch)]
        argv += ["-n", str(spec.requests)] if spec.requests is not None else ["-z", _go_duration(spec.duration_s)]
        if spec.unique:
            argv.append("-unique")
        if spec.stream:
            argv.append("-stream")
        if spec.rps:
            argv += ["-rps", f"{spec.rps:g}"]
        if spec.timeout_s:
            argv += ["-timeout", _go_duration(spec.timeout_s)]
        return argv

    def parse(self, stdout: str, spec: LoadSpec) -> LoadResult:
        data = _last_json_line(stdout, self.name)
        ok, seconds = int(data["ok"]), float(data["seconds"])
        return LoadResult(
            generator=self.name, ok=ok, errors={status_name(k): int(v) for k, v in (data.get("errors") or {}).items()},
            seconds=seconds, calls_per_s=float(data["rps"]), texts_per_s=float(data["texts_per_s"]),
            p50_ms=_ms_or_none(data, "p50_ms", ok), p90_ms=_ms_or_none(data, "p90_ms", ok),
            p95_ms=_ms_or_none(data, "p95_ms", ok), p99_ms=_ms_or_none(data, "p99_ms", ok),
            max_ms=_ms_or_none(data, "max_ms", ok), offered_rps=spec.rps,
            error_latency_ms={status_name(k): v for k, v in data["error_latency_ms"].items()}
            if data.get("error_latency_ms") else None,
            hung=_int_or_none(data.get("hung")), sent=_int_or_none(data.get("sent")),
            sent_per_s=data.get("sent_per_s"), send_lag_ms=data.get("send_lag_ms"),
        )


class PythonLoad(Grpcload):
    """gateway.bench.pyload: grpc.aio, same flags and output as grpcload."""

    name = "python"

    def command(self) -> list[str]:
        return [self.path, "-m", "gateway.bench.pyload"]


class Ghz(LoadGenerator):
    name = "ghz"
    exact_open_loop = False

    def supports(self, spec: LoadSpec) -> bool:
        return not spec.stream and spec.rps is None

    def argv(self, spec: LoadSpec, address: str, workdir: Path) -> list[str]:
        data = workdir / f"ghz-{spec.texts_file.stem}-b{spec.batch}{'-u' if spec.unique else ''}.json"
        if not data.exists():
            data.write_text(json.dumps(ghz_messages(spec)), encoding="utf-8")
        call = spec.method.lstrip("/").replace("/", ".")
        # --proto rather than reflection: the baselines (gostub, trivial server) serve no reflection.
        argv = [self.path, "--insecure", "--proto", str(PROTO_FILE), "--call", call, "-D", str(data),
                "-c", str(min(spec.concurrency, spec.requests or spec.concurrency)),  # ghz refuses n < c
                "--connections", str(spec.connections), "-O", "json"]
        if spec.timeout_s:
            argv += ["-t", f"{max(1, round(spec.timeout_s * 1000))}ms"]
        argv += ["-n", str(spec.requests)] if spec.requests is not None else ["-z", _go_duration(spec.duration_s)]
        return [*argv, address]

    def parse(self, stdout: str, spec: LoadSpec) -> LoadResult:
        data = json.loads(stdout)
        statuses = {status_name(k): int(v) for k, v in (data.get("statusCodeDistribution") or {}).items()}
        ok = statuses.pop("OK", 0)
        seconds = float(data["total"]) / 1e9  # Go durations are nanoseconds
        pct = {int(d["percentage"]): float(d["latency"]) / 1e6 for d in data.get("latencyDistribution") or []}
        rate = ok / seconds if seconds else 0.0
        return LoadResult(
            generator=self.name, ok=ok, errors=statuses, seconds=seconds, calls_per_s=rate,
            texts_per_s=rate * spec.batch, p50_ms=pct.get(50), p90_ms=pct.get(90), p95_ms=pct.get(95),
            p99_ms=pct.get(99), max_ms=float(data["slowest"]) / 1e6 if ok else None, offered_rps=None,
        )


def ghz_messages(spec: LoadSpec) -> list[dict]:
    """ghz sends element (request number mod len) of a JSON array for a unary
    call, and expands Go templates in it: {{.RequestNumber}} makes -unique."""
    texts = [line for line in spec.texts_file.read_text(encoding="utf-8").splitlines() if line]
    tag = " #{{.RequestNumber}}" if spec.unique else ""
    if spec.batch == 1:
        return [{"text": t + tag} for t in texts]
    groups = [[texts[(i * spec.batch + k) % len(texts)] for k in range(spec.batch)]
              for i in range(max(1, len(texts) // spec.batch))]
    return [{"texts": [f"{t}{tag}-{k}" if tag else t for k, t in enumerate(g)]} for g in groups]


def _last_json_line(stdout: str, name: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{name} printed no JSON result:\n{stdout[-2000:]}")


def _int_or_none(value) -> int | None:
    return None if value is None else int(value)


def _ms_or_none(data: dict, key: str, ok: int) -> float | None:
    return float(data[key]) if ok and key in data else None  # no successful call: no latency to speak of


@dataclass(frozen=True)
class Tools:
    ghz: str | None
    grpcload: str | None
    gostub: str | None


def _find(name: str, explicit: str | None) -> str | None:
    """--NAME flag, else PATH, else ../shared/tools/bin next to the repository."""
    if explicit:
        path = shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
        if path is None:
            raise ValueError(f"--{name} {explicit!r}: no such executable")
        return path
    found = shutil.which(name)
    if found:
        return found
    shared = REPO_ROOT.parent / "shared" / "tools" / "bin" / name
    return str(shared) if shared.is_file() else None


def find_tools(*, ghz: str | None, grpcload: str | None, gostub: str | None) -> Tools:
    return Tools(ghz=_find("ghz", ghz), grpcload=_find("grpcload", grpcload), gostub=_find("gostub", gostub))


def generators(tools: Tools, load: str) -> list[LoadGenerator]:
    """The generators to try, best first: the chosen one, then the fallbacks
    for what it cannot do (streams, open loop)."""
    available: dict[str, LoadGenerator] = {}
    if tools.ghz:
        available["ghz"] = Ghz(tools.ghz)
    if tools.grpcload:
        available["grpcload"] = Grpcload(tools.grpcload)
    available["python"] = PythonLoad(sys.executable)
    if load == "auto":
        return list(available.values())
    if load not in available:
        where = "PATH" if load == "ghz" else "--grpcload, PATH or ../shared/tools/bin (build it with build.sh)"
        raise ValueError(f"--load {load}: {load} not found on {where}")
    return [available[load]] + [g for name, g in available.items() if name != load and name != "ghz"]


def pick(gens: list[LoadGenerator], spec: LoadSpec, prefer: str | None = None) -> LoadGenerator:
    """The first generator that can run spec faithfully; `prefer` (a name) first when it is there."""
    if prefer is not None:
        for gen in gens:
            if gen.name == prefer and gen.supports(spec):
                return gen
    for gen in gens:
        if gen.supports(spec) and (spec.rps is None or gen.exact_open_loop):
            return gen
    return gens[-1]  # the Python generator supports everything
