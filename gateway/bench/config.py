"""The settings of one `tiergate bench` run, validated in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from protos.security import ClientSecurity

__all__ = ["BenchConfig", "LOAD_CHOICES", "parse_duration", "parse_rates"]

LOAD_CHOICES = ("auto", "ghz", "grpcload", "python")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}


def parse_duration(text: str) -> float:
    """'10s', '500ms', '1m' or a bare number of seconds -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"a duration looks like 10s, 500ms or 1m, got {text!r}")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def parse_rates(text: str) -> tuple[float, ...]:
    """'250,500,1000' -> (250.0, 500.0, 1000.0); '' or 'none' -> () (no sweep)."""
    if text.strip().lower() in ("", "none", "off"):
        return ()
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--rps-sweep takes comma-separated rates, e.g. 250,500,1000, got {text!r}") from None


@dataclass(frozen=True)
class BenchConfig:
    scenarios: tuple[str, ...]
    target: str | None = None                # a running gateway; None: start `tiergate serve` ourselves
    pid: int | None = None                   # with target: the process tree whose RSS is summed
    model: str | None = None                 # None: the default model
    workers: int | None = None               # None: serve's own default (no --workers flag passed)
    serve_args: tuple[str, ...] = ()         # extra flags for the serve child, e.g. ("--quantize", "off")
    load: str = "auto"
    concurrency: int = 50
    connections: int = 4
    duration_s: float = 10.0
    warmup_s: float = 2.0
    rps: float | None = None                 # open loop for every scenario; None: closed loop
    out: Path = Path("bench-out")
    compare: bool = False
    rps_sweep: tuple[float, ...] = (250, 500, 1000, 2000, 4000, 8000)
    sweep_duration_s: float = 3.0
    pipeline_texts: int = 1000
    classify_rows: int = 1000                # rows of the classify scenario's CSV (each of 40-60 words)
    miss_words: int = 20          # at least this many words per miss text (tweets: ~60 tokens); 0: single corpus texts
    miss_concurrency: int = 32               # calls in flight in the miss scenario (and the capacity probe)
    overload_duration_s: float = 30.0
    overload_concurrency: int = 1000         # the Python generator's workers: never run out of them
    idle_calls: int = 50                     # miss-idle's measured calls, and the bare forward passes
    call_timeout_s: float = 20.0             # per-call deadline in miss-80/overload: a call reaching it "hung"
    hit_texts: int = 1000
    zipf_texts: int = 10_000
    zipf_s: float = 1.1
    ghz: str | None = None                   # explicit tool paths; None: search (see loadgen.find_tools)
    grpcload: str | None = None
    gostub: str | None = None
    seed: int = 20240611                     # texts shuffle and Zipf samples: the same traffic every run
    security: ClientSecurity = ClientSecurity()  # TLS and token towards --target (its token is never logged)

    def __post_init__(self) -> None:
        # Whether each name is a known scenario is gateway.bench.catalog's to
        # say (check_scenarios): the scenarios depend on this config, not back.
        if not self.scenarios:
            raise ValueError("no scenarios to run (--scenarios is empty)")
        if self.load not in LOAD_CHOICES:
            raise ValueError(f"--load must be one of {', '.join(LOAD_CHOICES)}, got {self.load!r}")
        if self.target is not None:
            host, _, port = self.target.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--target must be HOST:PORT, got {self.target!r}")
            if self.workers is not None:
                raise ValueError(f"--workers {self.workers} only applies when bench starts the stack (no --target)")
        elif self.pid is not None:
            raise ValueError(f"--pid {self.pid} only applies with --target (bench knows its own stack's pid)")
        elif self.security.tls is not None:
            raise ValueError("--tls-ca and --tls-client-cert only apply with --target (bench's own stack is plaintext)")
        for name, value, low in (("--concurrency", self.concurrency, 1), ("--connections", self.connections, 1),
                                 ("--pipeline-texts", self.pipeline_texts, 1),
                                 ("--classify-rows", self.classify_rows, 1), ("--miss-words", self.miss_words, 0),
                                 ("hit_texts", self.hit_texts, 1),
                                 ("--miss-concurrency", self.miss_concurrency, 1),
                                 ("overload_concurrency", self.overload_concurrency, 1),
                                 ("idle_calls", self.idle_calls, 5),
                                 ("zipf_texts", self.zipf_texts, 2)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.pid is not None and self.pid < 1:
            raise ValueError(f"--pid must be a process id, got {self.pid}")
        if self.connections > self.concurrency:
            raise ValueError(f"--connections ({self.connections}) cannot exceed --concurrency ({self.concurrency}): "
                             "each connection needs at least one worker")
        if not self.duration_s > 0:
            raise ValueError(f"--duration must be > 0, got {self.duration_s}s")
        if not self.overload_duration_s > 0:
            raise ValueError(f"--overload-duration must be > 0, got {self.overload_duration_s}s")
        if not self.call_timeout_s > 0:
            raise ValueError(f"call_timeout_s must be > 0, got {self.call_timeout_s}s")
        if self.warmup_s < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup_s}s")
        if not self.sweep_duration_s > 0:
            raise ValueError(f"--sweep-duration must be > 0, got {self.sweep_duration_s}s")
        if self.rps is not None and not self.rps > 0:
            raise ValueError(f"--rps must be > 0, got {self.rps}")
        bad = [r for r in self.rps_sweep if not r > 0]
        if bad:
            raise ValueError(f"--rps-sweep rates must be > 0, got {bad[0]}")
        if not self.zipf_s > 0:
            raise ValueError(f"zipf_s must be > 0, got {self.zipf_s}")
