"""The metrics-cost scenario: hit-unary with metrics on against the same with metrics off.

The bench's own stack serves metrics (as `tiergate serve` does by default);
this scenario starts a second one with `--metrics-port 0` on the same L2
(so the hit texts are already there: no model time), then measures hit-unary
on each in turn, ROUNDS times alternating, each after its own warm-up, so
that drift in a shared machine hits both alike. The ratio of the medians of
calls/s (on / off) is the cost of counting, timing and publishing every call;
goals.py checks it against the issue's >= 0.95x. Both stacks are up during
the rounds but only one is loaded at a time.
Registered by importing this module (gateway.bench.catalog does).
"""

from __future__ import annotations

import statistics

from gateway.bench.scenarios import CLASSIFY, BenchContext, ScenarioResult, scenario
from gateway.bench.targets import start_stack

__all__ = ["ROUNDS"]

ROUNDS = 3


@scenario("metrics-cost", "hit-unary with metrics on vs off, alternating rounds", baseline=True)
def metrics_cost(ctx: BenchContext, name: str, about: str) -> ScenarioResult:
    cfg = ctx.config
    if not ctx.tiergate.info.get("started_by_bench"):
        raise RuntimeError("metrics-cost compares two stacks the bench starts itself (not --target)")
    if "--metrics-port" in cfg.serve_args:
        raise RuntimeError("metrics-cost needs the bench's stack to serve metrics: drop --metrics-port from "
                           "--serve-args")
    ctx.prime()
    off = start_stack(model=cfg.model, workers=cfg.workers, lmdb_path=ctx.workdir / "l2",
                      serve_args=(*cfg.serve_args, "--metrics-port", "0"), log_path=ctx.out / "serve-no-metrics.log")
    try:
        spec = ctx.spec(CLASSIFY, "hit")
        rounds: dict[str, list] = {"on": [], "off": []}
        for i in range(ROUNDS):
            for label, target in (("on", ctx.tiergate), ("off", off)):
                ctx.log(f"  round {i + 1}/{ROUNDS}, metrics {label}")
                for warm in ctx.warm_specs(spec, workers=ctx.workers):
                    ctx.run_load(target, warm)
                rounds[label].append(ctx.run_load(target, spec))
    finally:
        off.stop()
    res = ScenarioResult(name=name, target="tiergate", about=about)
    on_rates = [r.calls_per_s for r in rounds["on"]]
    off_rates = [r.calls_per_s for r in rounds["off"]]
    on_p50 = [r.p50_ms for r in rounds["on"]]
    off_p50 = [r.p50_ms for r in rounds["off"]]
    res.load = sorted(rounds["on"], key=lambda r: r.calls_per_s)[ROUNDS // 2]  # the median round, metrics on
    res.extras = {
        "rounds": ROUNDS,
        "on_calls_per_s": on_rates, "off_calls_per_s": off_rates,
        "on_p50_ms": on_p50, "off_p50_ms": off_p50,
        "ratio": statistics.median(on_rates) / statistics.median(off_rates) if min(off_rates) > 0 else None,
        "errors": sum(r.error_count for rounds_ in rounds.values() for r in rounds_),
    }
    res.notes.append(f"calls/s on {', '.join(f'{x:,.0f}' for x in on_rates)}; "
                     f"off {', '.join(f'{x:,.0f}' for x in off_rates)}")
    return res
