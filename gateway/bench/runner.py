"""One `tiergate bench` run: set up texts and servers, run the scenarios and
the latency sweep, print the table, write bench.json and the PNG."""

from __future__ import annotations

import datetime
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.bench.config import BenchConfig
from gateway.bench.goals import check_targets, render_targets
from gateway.bench.loadgen import Tools, find_tools, generators
from gateway.bench.procs import OthersCpu
from gateway.bench.report import (
    PNG_NAME,
    classify_lines,
    draw_latency_png,
    miss_lines,
    open_loop_line,
    ratio_legend,
    render_table,
    write_json,
)
from gateway.bench.catalog import SCENARIOS
from gateway.bench.scenarios import CLASSIFY, BenchContext, ScenarioResult
from gateway.bench.targets import Target, attach, read_stats, start_stack
from gateway.bench.texts import make_text_sets, unique_texts, write_lines, zipf_samples

__all__ = ["run"]

ZIPF_SAMPLES = 200_000       # measured run: more requests than a 10 s run sends, so it never replays itself
ZIPF_WARM_SAMPLES = 50_000
NOISY_CORES = 0.25           # other processes using more than this (cores, on average) make a scenario noisy
BEHIND = 0.85                # a sweep point whose achieved rate is below this share of the offered one is behind


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _python_warning(forced: bool) -> str:
    why = "--load python" if forced else "no ghz or grpcload found"
    return (f"warning: using the built-in Python load generator ({why}); on this "
            f"{os.cpu_count()}-core machine it measures itself as much as the server. Install ghz or build "
            f"../shared/tools (grpcload) for server numbers.")


def _write_texts(cfg: BenchConfig, workdir: Path, run_tag: str) -> tuple[dict[str, Path], str]:
    sets = make_text_sets(hit=cfg.hit_texts, zipf=cfg.zipf_texts, miss=cfg.pipeline_texts, run_tag=run_tag,
                          miss_words=cfg.miss_words,
                          seed=cfg.seed)
    files = {
        "hit": write_lines(workdir / "hit.txt", sets.hit),
        "miss": write_lines(workdir / "miss.txt", sets.miss),
        "zipf": write_lines(workdir / "zipf.txt", zipf_samples(sets.zipf, cfg.zipf_s, ZIPF_SAMPLES, cfg.seed + 1)),
        "zipf-warm": write_lines(workdir / "zipf-warm.txt",
                                 zipf_samples(sets.zipf, cfg.zipf_s, ZIPF_WARM_SAMPLES, cfg.seed + 2)),
        # Exactly what the miss scenario sends first (grpcload -unique numbering).
        "pipeline": write_lines(workdir / "pipeline.txt", unique_texts(sets.miss, cfg.pipeline_texts)),
    }
    return files, sets.source


def run_sweep(ctx: BenchContext) -> dict:
    """hit-unary open loop at each offered rate, a few seconds each, lowest
    first; stops after the first rate the server falls far behind."""
    cfg = ctx.config
    ctx.prime()
    base = ctx.spec(CLASSIFY, "hit", duration_s=cfg.sweep_duration_s)
    for warm in ctx.warm_specs(base.replace(rps=None), workers=ctx.workers):
        ctx.run_load(ctx.tiergate, warm)
    points, generator, stopped = [], None, None
    for rate in sorted(cfg.rps_sweep):
        res = ctx.run_load(ctx.tiergate, base.replace(rps=rate))
        generator = res.generator
        sent = res.ok + res.error_count
        behind = res.calls_per_s < BEHIND * rate or (sent and res.error_count > 0.01 * sent)
        points.append({"offered_rps": rate, "achieved_rps": res.calls_per_s, "p50_ms": res.p50_ms,
                       "p90_ms": res.p90_ms, "p95_ms": res.p95_ms, "p99_ms": res.p99_ms, "max_ms": res.max_ms,
                       "errors": res.errors, "ok": res.ok, "seconds": res.seconds, "behind": bool(behind)})
        _log(f"    offered {rate:,.0f}/s: achieved {res.calls_per_s:,.0f}/s, p50 {res.p50_ms} ms, p99 {res.p99_ms} ms")
        if behind:
            stopped = rate
            break
    return {"generator": generator, "duration_s": cfg.sweep_duration_s, "concurrency": cfg.concurrency,
            "connections": cfg.connections, "points": points, "stopped_at_rps": stopped}


def _machine() -> dict:
    import grpc

    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "python": platform.python_version(), "grpcio": grpc.__version__, "hostname": platform.node()}


def _start_target(cfg: BenchConfig, workdir: Path) -> Target:
    if cfg.target is not None:
        return attach(cfg.target, cfg.pid, cfg.security)
    _log("starting tiergate serve" + (f" --workers {cfg.workers}" if cfg.workers else "") +
         (f" --model {cfg.model}" if cfg.model else " (default model)"))
    return start_stack(model=cfg.model, workers=cfg.workers, lmdb_path=workdir / "l2", serve_args=cfg.serve_args,
                       log_path=cfg.out / "serve.log")


@dataclass
class Outcome:
    """Everything one run measured, for the table and bench.json."""

    started: datetime.datetime
    run_tag: str
    results: list[ScenarioResult] = field(default_factory=list)
    sweep: dict = field(default_factory=dict)
    target: Target | None = None
    workers_seen: int | None = None   # gateway workers, as GetStats counts them
    start_stats: dict | None = None   # GetStats before the first scenario
    text_source: str | None = None
    final_stats: dict | None = None
    interrupted: bool = False


def _measure(cfg: BenchConfig, tools: Tools, gens: list, out: Outcome) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="tiergate-bench-"))  # texts, ghz data, the started stack's L2
    try:
        files, out.text_source = _write_texts(cfg, workdir, out.run_tag)
        _log(f"texts: {out.text_source}")
        out.target = _start_target(cfg, workdir)
        stats = read_stats(out.target.address, out.target.security)
        if stats is None:
            _log(f"note: {out.target.address} serves no GatewayAdmin.GetStats: tier hits n/a")
        out.workers_seen = stats["workers"] if stats else None
        out.start_stats = stats
        ctx = BenchContext(config=cfg, gens=gens, workdir=workdir, out=cfg.out, files=files, tiergate=out.target,
                           log=_log, gostub_path=tools.gostub, workers=out.workers_seen or 1, stats=stats,
                           run_tag=out.run_tag)
        for i, name in enumerate(cfg.scenarios, 1):
            scen = SCENARIOS[name]
            _log(f"[{i}/{len(cfg.scenarios)}] {name}: {scen.about}")
            t0 = time.monotonic()
            others = OthersCpu(os.getpid())
            try:
                out.results.append(scen.run(ctx))
            except Exception as exc:  # one broken scenario should not cost the others
                _log(f"  {name} failed: {exc}")
                out.results.append(ScenarioResult(name=name, target="-", about=scen.about, error=str(exc)))
            out.results[-1].extras["others_cpu_cores"] = round(others.cores(), 2)
            _log(f"  done in {time.monotonic() - t0:.1f} s (other processes used "
                 f"{out.results[-1].extras['others_cpu_cores']:.2f} cores meanwhile)")
        if cfg.rps_sweep and "hit-unary" in cfg.scenarios:
            _log(f"latency sweep: hit-unary open loop at {', '.join(f'{r:g}' for r in sorted(cfg.rps_sweep))} calls/s")
            try:
                out.sweep = run_sweep(ctx)
            except Exception as exc:
                _log(f"  the sweep failed: {exc}")
                out.sweep = {"error": str(exc)}
        out.final_stats = read_stats(out.target.address, out.target.security)
    except KeyboardInterrupt:
        out.interrupted = True
        _log("interrupted: reporting what was measured so far")
    finally:
        if out.target is not None:
            out.target.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _header(cfg: BenchConfig, out: Outcome, primary) -> list[str]:
    where = "started by bench" if cfg.target is None else "--target"
    if out.workers_seen:
        where += f", {out.workers_seen} gateway worker{'s' if out.workers_seen > 1 else ''}"
    stats = out.start_stats or {}
    if stats.get("model"):
        where += f", model {stats['model']}" + "".join(f" {stats[k]}" for k in ("model_dtype", "model_device")
                                                         if stats.get(k))
    address = out.target.address if out.target else "?"
    return [f"tiergate bench: {address} ({where}); load generator {primary.name} ({primary.path}); "
            f"c={cfg.concurrency} (miss: {cfg.miss_concurrency}), connections={cfg.connections}, "
            f"{cfg.duration_s:g}s per scenario; {os.cpu_count()} cores", ""]


def _footer(cfg: BenchConfig, out: Outcome, primary, png_msg: str) -> list[str]:
    lines = [""]
    line = open_loop_line(out.results)
    if line:
        lines.append(line)
    lines += miss_lines(out.results)
    lines += classify_lines(out.results)
    lines += ratio_legend(out.results)
    if cfg.target is not None and cfg.pid is None:
        lines.append("RSS n/a: with --target, pass --pid PID (the gateway's root process) to sum its process tree")
    if primary.name == "python":
        lines.append(_python_warning(cfg.load == "python"))
    noisy = [(r.name, r.extras["others_cpu_cores"]) for r in out.results
             if r.extras.get("others_cpu_cores", 0) > NOISY_CORES]
    if noisy:
        lines.append(f"noise: other processes on this {os.cpu_count()}-core machine used on average "
                     + ", ".join(f"{c:.2f} cores during {n}" for n, c in noisy)
                     + ": those rows measure the machine's other work too")
        if any(n == "pipeline" for n, _ in noisy):
            lines.append("noise and the pipeline: it runs torch from its main thread, where libgomp spin-waits at "
                         "full count, so other work on the cores slows it far more than the stack (whose model "
                         "runs in a worker thread): miss vs pipeline from this run overstates tiergate")
    for res in out.results:
        lines += [f"note ({res.name}): {n}" for n in res.notes if not n.startswith("argv:")]
    if out.interrupted:
        lines.append("interrupted: scenarios after the last row did not run")
    lines.append(png_msg)
    return lines


def _document(cfg: BenchConfig, out: Outcome, tools: Tools, gens: list) -> dict:
    target = out.target
    return {
        "tiergate_bench": 1,
        "timestamp": out.started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": sys.argv,
        "cwd": os.getcwd(),
        "machine": _machine(),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "load_generator": {"primary": gens[0].name, "path": gens[0].path,
                           "fallbacks": [g.name for g in gens[1:]], "tools": tools.__dict__},
        "target": {"address": target.address, "pid": target.pid, "workers": out.workers_seen, **target.info}
        if target else None,
        "start_stats": out.start_stats,
        "final_stats": out.final_stats,
        "run_tag": out.run_tag,
        "texts": {"source": out.text_source, "hit": cfg.hit_texts, "zipf_distinct": cfg.zipf_texts,
                  "zipf_s": cfg.zipf_s, "miss_and_pipeline": cfg.pipeline_texts},
        "sweep": out.sweep,
        "interrupted": out.interrupted,
    }


def run(cfg: BenchConfig) -> int:
    """Runs the benchmark; prints the table; returns 1 if a scenario failed, 2 if a
    load tool is missing or unusable (nothing ran), else 0."""
    out = Outcome(started=datetime.datetime.now(datetime.UTC), run_tag=secrets.token_hex(3))
    cfg.out.mkdir(parents=True, exist_ok=True)
    try:  # a missing tool, or a ghz too old for the flags we pass: say so before any stack starts
        tools = find_tools(ghz=cfg.ghz, grpcload=cfg.grpcload, gostub=cfg.gostub)
        gens = generators(tools, cfg.load, secure=bool(cfg.security.tls or cfg.security.token))
    except ValueError as exc:
        print(f"tiergate bench: error: {exc}", file=sys.stderr)
        return 2
    if gens[0].name == "python":
        _log(_python_warning(cfg.load == "python"))
    _measure(cfg, tools, gens, out)
    png_msg = draw_latency_png(cfg.out / PNG_NAME, out.sweep,
                               f"tiergate hit-unary latency vs offered load ({out.sweep.get('generator')}, "
                               f"c={cfg.concurrency}, conns={cfg.connections}, {cfg.sweep_duration_s:g}s/point, "
                               f"{os.cpu_count()} cores)")
    checks = check_targets(out.results, (out.start_stats or {}).get("model_dtype"))
    json_path = write_json(cfg.out / "bench.json", _document(cfg, out, tools, gens), out.results, checks)
    footer = _footer(cfg, out, gens[0], png_msg) + [""] + render_targets(checks) + [f"wrote {json_path}"]
    print(render_table(out.results, header=_header(cfg, out, gens[0]), footer=footer), flush=True)
    return 1 if out.interrupted or any(r.error for r in out.results) else 0
