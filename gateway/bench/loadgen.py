"""Load generators behind one interface: ghz, grpcload, or the built-in Python one.

Each runs as a child process and reports the same fields (LoadResult), so a
scenario does not care which one ran. Preference: ghz (the usual gRPC tool)
when found (--ghz, PATH or ../shared/tools/bin) and its --help lists every flag
we pass (Ghz.check), else grpcload (../shared/tools), else the Python
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
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from protos.security import ClientSecurity

__all__ = ["LoadSpec", "LoadResult", "LoadGenerator", "Tools", "find_tools", "generators", "pick"]

TOKEN_ENV = "TIERGATE_AUTH_TOKEN"  # how the Python generator gets a token: never in its argv
REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_FILE = REPO_ROOT / "protos" / "classifier.proto"
# Every flag Ghz.argv can pass: Ghz.check refuses a ghz whose --help lacks one.
GHZ_FLAGS = ("--insecure", "--cacert", "--cert", "--key", "--metadata-file", "--proto", "--call", "--data-file",
             "--disable-template-functions", "--disable-template-data", "--concurrency", "--connections",
             "--format", "--timeout", "--total", "--duration", "--duration-stop")


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
    if not code:
        return "UNKNOWN"  # ghz files an error that carries no gRPC status (e.g. a client-side one) under ""
    name = code if code.isupper() else re.sub(r"(?<!^)(?=[A-Z])", "_", code).upper()
    return "CANCELLED" if name == "CANCELED" else name  # Go spells it Canceled; gRPC's name is CANCELLED


def _go_duration(seconds: float) -> str:
    return f"{max(1, int(round(seconds * 1000)))}ms"


class LoadGenerator:
    name = "?"
    exact_open_loop = True  # measures latency from the scheduled send time

    def __init__(self, path: str) -> None:
        self.path = path

    def supports(self, spec: LoadSpec) -> bool:
        return True

    def speaks_tls(self) -> bool:
        """Whether it can send TLS and a bearer token (--target with --tls-ca/--auth-token-file)."""
        return True

    def argv(self, spec: LoadSpec, address: str, workdir: Path, security: ClientSecurity | None = None,
             secret_dir: str | None = None) -> list[str]:
        raise NotImplementedError

    def parse(self, stdout: str, spec: LoadSpec) -> LoadResult:
        raise NotImplementedError

    def run(self, spec: LoadSpec, address: str, workdir: Path, security: ClientSecurity | None = None) -> LoadResult:
        if security is not None and (security.tls or security.token) and not self.speaks_tls():
            raise RuntimeError(f"{self.name} speaks neither TLS nor bearer tokens; use --load ghz or python")
        # A token goes to the child in its environment or a 0600 file removed after the run, never in argv.
        env = {**os.environ, TOKEN_ENV: security.token} if security is not None and security.token else None
        with tempfile.TemporaryDirectory(prefix="tiergate-load-") as secret_dir:
            argv = self.argv(spec, address, workdir, security, secret_dir)
            # Generous: a closed loop finishes its calls in flight after the duration, each up to its deadline.
            limit = (spec.duration_s or 0) + 180 if spec.requests is None else 1800
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit, stdin=subprocess.DEVNULL,
                                  env=env)
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

    def speaks_tls(self) -> bool:
        return False  # ../shared/tools/grpcload is plaintext only

    def argv(self, spec: LoadSpec, address: str, workdir: Path, security: ClientSecurity | None = None,
             secret_dir: str | None = None) -> list[str]:
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
        if security is not None and security.tls is not None:
            tls = security.tls
            argv += ["-tls"] + (["-cacert", tls.ca] if tls.ca else []) + \
                (["-cert", tls.cert, "-key", tls.key] if tls.cert else [])
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

    def speaks_tls(self) -> bool:
        return True  # TLS flags in argv, the token from $TIERGATE_AUTH_TOKEN


class Ghz(LoadGenerator):
    """ghz (github.com/bojand/ghz; v0.121.0 is what ../shared/tools/ghz/build.sh builds)."""

    name = "ghz"
    exact_open_loop = False

    def supports(self, spec: LoadSpec) -> bool:
        return not spec.stream and spec.rps is None

    def check(self) -> str:
        """Its version; ValueError saying what to do when it does not run or
        lacks a flag that argv() passes (an older ghz)."""
        try:
            usage = subprocess.run([self.path, "--help"], capture_output=True, text=True, timeout=30,
                                   stdin=subprocess.DEVNULL)
            version = subprocess.run([self.path, "--version"], capture_output=True, text=True, timeout=30,
                                     stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ValueError(f"ghz {self.path}: cannot run it ({exc})") from None
        # kingpin prints --version and --help on stderr
        said = re.search(r"\bv?\d+\.\d+\S*", version.stderr + version.stdout) if version.returncode == 0 else None
        found = said.group(0) if said else "version unknown"
        text = usage.stdout + usage.stderr
        missing = [flag for flag in GHZ_FLAGS if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
        if usage.returncode != 0 or missing:
            lacks = f"its --help lists no {', '.join(missing)}" if missing else f"--help exits {usage.returncode}"
            raise ValueError(f"ghz {self.path} ({found}): {lacks}; tiergate bench passes these (ghz v0.121.0 "
                             f"has them: build it with ../shared/tools/ghz/build.sh), or use --load grpcload")
        return found

    def argv(self, spec: LoadSpec, address: str, workdir: Path, security: ClientSecurity | None = None,
             secret_dir: str | None = None) -> list[str]:
        data = workdir / f"ghz-{spec.texts_file.stem}-b{spec.batch}{'-u' if spec.unique else ''}.json"
        if not data.exists():
            data.write_text(json.dumps(ghz_messages(spec)), encoding="utf-8")
        call = spec.method.lstrip("/").replace("/", ".")
        concurrency = min(spec.concurrency, spec.requests or spec.concurrency)  # ghz refuses n < c
        # --proto rather than reflection: the baselines (gostub, trivial server) serve no reflection.
        # ghz builds a text/template with sprig's ~100 functions for every call unless told not to: on a
        # small machine that is CPU the server under test does not get. -unique needs {{.RequestNumber}}.
        argv = [self.path, *_ghz_security(security, secret_dir), "--proto", str(PROTO_FILE), "--call", call,
                "--data-file", str(data), "--disable-template-functions",
                *([] if spec.unique else ["--disable-template-data"]),
                "--concurrency", str(concurrency),
                "--connections", str(min(spec.connections, concurrency)),  # ghz refuses connections > c
                "--format", "json"]
        if spec.timeout_s:
            argv += ["--timeout", f"{max(1, round(spec.timeout_s * 1000))}ms"]
        if spec.requests is not None:
            argv += ["--total", str(spec.requests)]
        else:
            # ghz's default (close) cuts the calls in flight at the end and counts them as UNAVAILABLE:
            # wait for them, as grpcload and the Python generator do.
            argv += ["--duration", _go_duration(spec.duration_s), "--duration-stop", "wait"]
        return [*argv, address]

    def parse(self, stdout: str, spec: LoadSpec) -> LoadResult:
        """ghz's JSON report: every duration (total, average, fastest, slowest,
        latencyDistribution[].latency, details[].latency) is Go's
        time.Duration, in nanoseconds; histogram marks are in seconds (unused).
        The latencies are of the OK calls only (no --count-errors)."""
        try:
            data = json.loads(stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"ghz printed no JSON report:\n{stdout[-2000:]}") from None
        statuses: dict[str, int] = {}
        for code, count in (data.get("statusCodeDistribution") or {}).items():
            statuses[status_name(code)] = statuses.get(status_name(code), 0) + int(count)
        ok = statuses.pop("OK", 0)
        seconds = float(data["total"]) / 1e9
        pct = {int(d["percentage"]): float(d["latency"]) / 1e6
               for d in data.get("latencyDistribution") or [] if d.get("latency")}
        rate = ok / seconds if seconds else 0.0  # calls/s of OK calls, like grpcload (ghz's own rps counts errors)
        return LoadResult(
            generator=self.name, ok=ok, errors=statuses, seconds=seconds, calls_per_s=rate,
            texts_per_s=rate * spec.batch, p50_ms=pct.get(50), p90_ms=pct.get(90), p95_ms=pct.get(95),
            p99_ms=pct.get(99),
            max_ms=float(data["slowest"]) / 1e6 if ok else None, offered_rps=None,
        )


def _ghz_security(security: ClientSecurity | None, secret_dir: str | None) -> list[str]:
    if security is None or security.tls is None:
        argv = ["--insecure"]
    else:
        tls = security.tls
        argv = (["--cacert", tls.ca] if tls.ca else []) + (["--cert", tls.cert, "--key", tls.key] if tls.cert else [])
    if security is not None and security.token:
        path = os.path.join(secret_dir, "metadata.json")  # in a 0700 directory removed after the run
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"authorization": f"Bearer {security.token}"}, fh)
        argv += ["--metadata-file", path]
    return argv


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


def generators(tools: Tools, load: str, secure: bool = False) -> list[LoadGenerator]:
    """The generators to try, best first: the chosen one, then the fallbacks
    for what it cannot do (streams, open loop). secure: only those that speak
    TLS and tokens (not grpcload). A ghz that fails Ghz.check is an error
    with --load ghz, and skipped with a warning on stderr with auto."""
    available: dict[str, LoadGenerator] = {}
    if tools.ghz and load in ("auto", "ghz"):  # other choices never fall back to ghz
        ghz = Ghz(tools.ghz)
        try:
            ghz.check()
            available["ghz"] = ghz
        except ValueError as exc:
            if load == "ghz":
                raise
            print(f"warning: not using ghz: {exc}", file=sys.stderr, flush=True)
    if tools.grpcload and not secure:
        available["grpcload"] = Grpcload(tools.grpcload)
    available["python"] = PythonLoad(sys.executable)
    if secure and load == "grpcload":
        raise ValueError("--load grpcload speaks neither TLS nor bearer tokens: use --load ghz or python")
    if load == "auto":
        return list(available.values())
    if load not in available:
        where = ("--ghz, PATH or ../shared/tools/bin (build it with ../shared/tools/ghz/build.sh)" if load == "ghz"
                 else "--grpcload, PATH or ../shared/tools/bin (build it with ../shared/tools/build.sh)")
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
