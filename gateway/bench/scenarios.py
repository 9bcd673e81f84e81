"""The named scenarios of `tiergate bench`: a registry of name -> function.

A scenario gets the run's BenchContext (settings, load generators, text files,
the tiergate target) and returns one ScenarioResult. Adding one is a function
with the @scenario decorator; `--scenarios` and the default list pick it up.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.bench.config import BenchConfig
from gateway.bench.cpu_cost import cost_per_text, read_cpu
from gateway.bench.loadgen import LoadGenerator, LoadResult, LoadSpec, pick
from gateway.bench.procs import RssSnapshot
from gateway.bench.targets import (
    Target,
    counter_diff,
    read_settled_stats,
    start_gostub,
    start_trivial,
)

__all__ = ["SCENARIOS", "Scenario", "ScenarioResult", "BenchContext", "scenario", "model_dir", "run_baseline",
           "served_model_flags",
           "CLASSIFY", "CLASSIFY_BATCH", "CLASSIFY_STREAM", "OPEN_LOOP_RPS", "HIT_BATCH"]

CLASSIFY = "/tiergate.v1.Classifier/Classify"
CLASSIFY_BATCH = "/tiergate.v1.Classifier/ClassifyBatch"
CLASSIFY_STREAM = "/tiergate.v1.Classifier/ClassifyStream"
HIT_BATCH = 100        # texts per ClassifyBatch in hit-batch
OPEN_LOOP_RPS = 1000   # the offered load of hit-unary-1000rps
PRIME_BATCH = 20       # texts per call when the hit set is first scored: small enough that a call's
                       # texts fit the model's 1 s queue limit even in float32 on AVX2 cores
PRIME_ATTEMPTS = 5     # passes over the hit set while the gateway refuses some calls (backpressure)


@dataclass
class ScenarioResult:
    name: str
    target: str                              # "tiergate", "gostub", "trivial-aio", "pipeline"
    about: str
    load: LoadResult | None = None
    warm: list[LoadResult] = field(default_factory=list)
    counters: dict[str, int] | None = None   # GetStats after minus before; None where not served
    rss: RssSnapshot | None = None           # at the end of the scenario; None: not measurable
    rss_peak_mb: float | None = None
    pipeline: dict | None = None             # the pipeline baseline's own JSON line
    extras: dict[str, Any] = field(default_factory=dict)  # scenario-specific figures (plain JSON values)
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def calls_per_s(self) -> float | None:
        return self.load.calls_per_s if self.load else None

    @property
    def texts_per_s(self) -> float | None:
        if self.pipeline:
            return self.pipeline["texts_per_s"]
        return self.load.texts_per_s if self.load else None

    @property
    def rss_mb(self) -> float | None:
        if self.pipeline:
            return self.pipeline["rss_mb"]
        return self.rss.total_mb if self.rss else None


@dataclass
class BenchContext:
    config: BenchConfig
    gens: list[LoadGenerator]
    workdir: Path                 # scratch: text files, ghz data
    out: Path
    files: dict[str, Path]        # "hit", "miss", "zipf", "zipf-warm", "pipeline"
    tiergate: Target
    log: Callable[[str], None]
    gostub_path: str | None = None
    workers: int = 1              # gateway workers, from GetStats when served
    stats: dict | None = None     # GetStats at the start (model_dtype, model_device), None when not served
    primed: bool = False
    miss_capacity: float | None = None  # texts/s of closed-loop misses (the miss scenario, or a probe)
    miss_capacity_from: str = ""
    run_tag: str = ""             # this run's tag, in every text no earlier run sent (see texts.make_text_sets)

    def fresh(self, tag: str) -> str:
        """A new file of miss texts that no earlier scenario sent (each line
        gets " ~tag"; the generators' -unique numbering restarts at 0 every
        run, so reusing the miss file would replay its texts): its files key."""
        key = f"miss-{tag}"
        if key not in self.files:
            lines = self.files["miss"].read_text(encoding="utf-8").splitlines()
            path = self.workdir / f"{key}.txt"
            path.write_text("".join(f"{line} ~{tag}\n" for line in lines if line), encoding="utf-8")
            self.files[key] = path
        return key

    def spec(self, method: str, texts: str, **kw) -> LoadSpec:
        cfg = self.config
        base = dict(concurrency=cfg.concurrency, connections=cfg.connections, duration_s=cfg.duration_s, rps=cfg.rps)
        return LoadSpec(method=method, texts_file=self.files[texts], **{**base, **kw})

    def warm_specs(self, spec: LoadSpec, *, workers: int = 1, texts: str | None = None) -> list[LoadSpec]:
        """The runs before a measured one: the same load (closed loop) for
        --warmup, on `texts` when given; then, with several gateway workers,
        enough passes over the texts to reach every worker's L1."""
        if self.config.warmup_s <= 0:
            return []
        connections = spec.connections
        if workers > 1:
            # Each new connection lands on one worker (SO_REUSEPORT hashes
            # connections, not calls) and the measured run opens new ones, so
            # it may land on workers the warm run barely reached: warm over
            # several connections per worker, several passes per worker. What
            # is still missed is answered from L2 once and shows in the tier hits.
            connections = min(spec.concurrency, max(spec.connections, 4 * workers))
        base = spec.replace(rps=None, connections=connections, requests=None)
        runs = [base.replace(duration_s=self.config.warmup_s,
                             texts_file=self.files[texts] if texts else spec.texts_file)]
        if workers > 1 and texts is None:
            lines = len(spec.texts_file.read_text(encoding="utf-8").splitlines())
            runs.append(base.replace(duration_s=None, requests=math.ceil(4 * workers * lines / spec.batch)))
        return runs

    def run_load(self, target: Target, spec: LoadSpec, prefer: str | None = None) -> LoadResult:
        gen = pick(self.gens, spec, prefer)
        self.log(f"  {gen.name}: {_describe(spec)}")
        return gen.run(spec, target.address, self.workdir, target.security)

    def prime(self) -> None:
        """Score every hit text once (ClassifyBatch, one call at a time): the
        model's cost is paid here, and the warm runs only spread the texts
        from L2 into each worker's L1."""
        if self.primed:
            return
        n = len(self.files["hit"].read_text(encoding="utf-8").splitlines())
        spec = LoadSpec(method=CLASSIFY_BATCH, texts_file=self.files["hit"], batch=PRIME_BATCH, concurrency=1,
                        connections=1, duration_s=None, requests=math.ceil(n / PRIME_BATCH))
        self.log(f"priming {n} hit texts")
        for attempt in range(1, PRIME_ATTEMPTS + 1):
            # A refusal (the model's queue full on a busy machine) leaves the
            # texts scored so far in L2: another pass costs only what is missing.
            result = self.run_load(self.tiergate, spec)
            if not result.error_count:
                break
            if set(result.errors) - {"RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED"}:
                raise RuntimeError(f"priming the hit texts failed: {result.errors}")
            self.log(f"  priming pass {attempt}: {result.errors}; again")
        else:
            raise RuntimeError(f"priming the hit texts failed {PRIME_ATTEMPTS} times, last: {result.errors}")
        self.primed = True

    def measure(self, name: str, about: str, target: Target, spec: LoadSpec, warm: list[LoadSpec], *,
                prefer: str | None = None, then: Callable[[ScenarioResult], None] | None = None) -> ScenarioResult:
        """Warm runs, then the measured one with the RSS sampled; `then` runs
        right after it (before the counters are read, so they include it)."""
        res = ScenarioResult(name=name, target=target.name, about=about)
        res.warm = [self.run_load(target, w, prefer) for w in warm]
        before = read_settled_stats(target.address, security=target.security) if target.name == "tiergate" else None
        with target.sampler() as sampler:
            res.load = self.run_load(target, spec, prefer)
            res.rss = sampler.end()
        res.rss_peak_mb = sampler.peak_mb if res.rss else None
        if then is not None:
            then(res)
        after = read_settled_stats(target.address, security=target.security) if before is not None else None
        res.counters = counter_diff(before, after)
        wanted = prefer or self.gens[0].name
        if res.load.generator != wanted:
            res.notes.append(f"ran with {res.load.generator}: {wanted} cannot run it the same way")
        return res


def _describe(spec: LoadSpec) -> str:
    what = [spec.method.rsplit("/", 1)[-1], f"c={spec.concurrency}", f"conns={spec.connections}"]
    what.append(f"n={spec.requests}" if spec.requests is not None else f"{spec.duration_s:g}s")
    for flag, on in ((f"batch={spec.batch}", spec.batch > 1), ("unique", spec.unique), ("stream", spec.stream),
                     (f"rps={spec.rps or 0:g}", bool(spec.rps))):
        if on:
            what.append(flag)
    return " ".join(what) + f" ({spec.texts_file.name})"


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    run: Callable[[BenchContext], ScenarioResult]
    baseline: bool = False  # in the default list only with --compare


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, about: str, *, baseline: bool = False):
    def register(fn: Callable[[BenchContext, str, str], ScenarioResult]):
        SCENARIOS[name] = Scenario(name, about, lambda ctx: fn(ctx, name, about), baseline)
        return fn

    return register


@scenario("hit-unary", "Classify, every text cached")
def hit_unary(ctx: BenchContext, name: str, about: str) -> ScenarioResult:
    ctx.prime()
    spec = ctx.spec(CLASSIFY, "hit")
    return ctx.measure(name, about, ctx.tiergate, spec, ctx.warm_specs(spec, workers=ctx.workers))


@scenario("hit-batch", f"ClassifyBatch of {HIT_BATCH} cached texts")
def hit_batch(ctx: BenchContext, name: str, about: str) -> ScenarioResult:
    ctx.prime()
    spec = ctx.spec(CLASSIFY_BATCH, "hit", batch=HIT_BATCH)
    return ctx.measure(name, about, ctx.tiergate, spec, ctx.warm_specs(spec, workers=ctx.workers))


@scenario("hit-stream", "ClassifyStream, cached texts, one stream per worker")
def hit_stream(ctx: BenchContext, name: str, about: str) -> ScenarioResult:
    ctx.prime()
    spec = ctx.spec(CLASSIFY_STREAM, "hit", stream=True)
    return ctx.measure(name, about, ctx.tiergate, spec, ctx.warm_specs(spec, workers=ctx.workers))


@scenario("miss", "Classify, every text new (the model scores each), --miss-concurrency calls in flight")
def miss(ctx: BenchContext, name: str, about: str) -> ScenarioResult:
    cfg = ctx.config
    spec = ctx.spec(CLASSIFY, "miss", unique=True, concurrency=cfg.miss_concurrency,
                    connections=min(cfg.connections, cfg.miss_concurrency))
    target = ctx.tiergate
    metrics_port = target.info.get("metrics_port")
    cpu_before = read_cpu(target.pid, metrics_port) if target.pid and metrics_port else None

    def cpu_after(res: ScenarioResult) -> None:
        if cpu_before is not None:
            try:
                res.extras["cpu_per_text"] = cost_per_text(cpu_before, read_cpu(target.pid, metrics_port),
                                                           res.load.seconds)
            except OSError as exc:
                res.notes.append(f"the CPU breakdown failed: {exc}")

    res = ctx.measure(name, f"Classify, every text new (the model scores each), c={spec.concurrency}",
                      target, spec, [], then=cpu_after)
    if res.load.texts_per_s > 0 and spec.rps is None:
        ctx.miss_capacity, ctx.miss_capacity_from = res.load.texts_per_s, "the miss scenario"
    if ctx.config.compare:
        try:
            res.extras["model_alone"] = model_alone(ctx, spec.texts_file, min(cfg.duration_s, MODEL_ALONE_S))
        except Exception as exc:  # the row stands without its ceiling
            res.notes.append(f"the model-alone baseline failed: {exc}")
    return res


MODEL_ALONE_S = 10.0


def model_alone(ctx: BenchContext, texts: Path, seconds: float) -> dict:
    """The served model with every lane busy and nothing else (inference.pipeline_baseline
    --model-alone), on the same texts, in a child process while the stack is idle."""
    stats = ctx.stats or {}
    argv = [sys.executable, "-m", "inference.pipeline_baseline", "--model", model_dir(ctx.config.model),
            "--texts", str(texts), "--model-alone", f"{seconds:g}",
            "--group-window", str(ctx.config.miss_concurrency), *served_model_flags(ctx)]
    ctx.log(f"  model alone: {seconds:g}s, every lane busy, as served ({stats.get('model_dtype') or '?'} on "
            f"{stats.get('model_device') or '?'}; stack idle)")
    return {**run_baseline(ctx, argv, "model_alone.log", timeout_s=1800), "argv": argv}


def served_model_flags(ctx: BenchContext) -> list[str]:
    """inference.pipeline_baseline flags for the precision and device the stack serves (GetStats)."""
    stats = ctx.stats or {}
    dtype, device = stats.get("model_dtype") or "", stats.get("model_device") or ""
    flags = {"int8-dynamic": ["--quantize", "on", "--runtime", "torch"], "float32": ["--quantize", "off"]}.get(
        dtype, ["--quantize", "on"] if dtype.startswith("int8") else [])  # int8-per-token: onnxruntime's
    if device == "cpu" or device.startswith("cuda"):
        flags += ["--device", device]
    return flags


def run_baseline(ctx: BenchContext, argv: list[str], log_name: str, *, timeout_s: float) -> dict:
    """Runs an inference.pipeline_baseline child; its one JSON line (stderr goes to log_name)."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    (ctx.out / log_name).write_text(proc.stderr, encoding="utf-8")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"status {proc.returncode}: {proc.stderr[-1500:]}")
    return json.loads(lines[-1])


@scenario("zipf", "Classify, texts drawn from Zipf(s) over distinct texts")
def zipf(ctx: BenchContext, name: str, about: str) -> ScenarioResult:
    # Warm with other samples of the same distribution: the popular texts are
    # then cached, as in a steady state, and the measured run still meets its
    # own first sight of tail texts (replaying the warm file would be all hits).
    spec = ctx.spec(CLASSIFY, "zipf")
    about = f"Classify, Zipf(s={ctx.config.zipf_s:g}) over {ctx.config.zipf_texts} distinct texts"
    return ctx.measure(name, about, ctx.tiergate, spec, ctx.warm_specs(spec, texts="zipf-warm"))


@scenario("hit-unary-1000rps", f"Classify, cached, open loop at {OPEN_LOOP_RPS} offered calls/s")
def hit_unary_open(ctx: BenchContext, name: str, about: str) -> ScenarioResult:
    ctx.prime()
    spec = ctx.spec(CLASSIFY, "hit", rps=OPEN_LOOP_RPS)
    return ctx.measure(name, about, ctx.tiergate, spec, ctx.warm_specs(spec, workers=ctx.workers))


def _baseline(ctx: BenchContext, name: str, about: str, target: Target) -> ScenarioResult:
    try:
        spec = ctx.spec(CLASSIFY, "hit")
        return ctx.measure(name, about, target, spec, ctx.warm_specs(spec))
    finally:
        target.stop()


@scenario("gostub", "hit-unary against gostub (grpc-go, fixed answer)", baseline=True)
def gostub(ctx: BenchContext, name: str, about: str) -> ScenarioResult:
    if ctx.gostub_path is None:
        raise RuntimeError("gostub not found (--gostub, PATH or ../shared/tools/bin; build it with build.sh)")
    return _baseline(ctx, name, about, start_gostub(ctx.gostub_path, ctx.out / "gostub.log"))


@scenario("trivial-aio", "hit-unary against a trivial grpc.aio server (fixed bytes)", baseline=True)
def trivial_aio(ctx: BenchContext, name: str, about: str) -> ScenarioResult:
    return _baseline(ctx, name, about, start_trivial(ctx.out / "trivial_server.log"))


@scenario("pipeline", "transformers pipeline in one process, batches of 8, the miss texts", baseline=True)
def pipeline(ctx: BenchContext, name: str, about: str) -> ScenarioResult:
    model = model_dir(ctx.config.model)
    argv = [sys.executable, "-m", "inference.pipeline_baseline", "--model", model,
            "--texts", str(ctx.files["pipeline"]), "--batch-size", "8", "--limit", str(ctx.config.pipeline_texts)]
    ctx.log(f"  pipeline baseline: {ctx.config.pipeline_texts} texts, model {model}")
    try:
        line = run_baseline(ctx, argv, "pipeline.log", timeout_s=3600)
    except RuntimeError as exc:
        raise RuntimeError(f"the pipeline baseline failed ({exc})") from None
    res = ScenarioResult(name=name, target="pipeline", about=about, pipeline=line)
    res.rss_peak_mb = res.pipeline.get("peak_rss_mb")
    res.notes.append(f"argv: {' '.join(argv)}")
    return res


def model_dir(model: str | None) -> str:
    """The pipeline needs a checkpoint directory: --model, else the built default model."""
    if model and os.path.isdir(model):
        return model
    if model:
        raise RuntimeError(f"the pipeline baseline needs a checkpoint directory; --model {model!r} is not one")
    from inference.paths import default_model_dir  # light: no torch

    path = default_model_dir()
    if not (path / "config.json").is_file():
        raise RuntimeError(f"the default model is not built at {path} (tiergate model build), or pass --model DIR")
    return str(path)
