"""The miss-path scenarios: what a new text costs when the model has to score it.

- miss-idle: one caller, one new text at a time, against one bare forward pass
  of the same model on the same texts (inference.pipeline_baseline
  --bare-forward, run in the same bench run while the stack is idle).
- miss-80: new texts, open loop at 80% of the measured miss capacity.
- overload: new texts, open loop at twice the measured miss capacity, with the
  Python generator (it times refusals per status code and counts calls that
  hit their deadline), then a recovery probe of sequential new texts.

"The measured miss capacity" is the texts/s of the miss scenario of this run
(closed loop, --miss-concurrency calls in flight); without it, a short probe of
the same load measures it first. Registered by importing this module (gateway.bench.catalog does).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict

from gateway.bench.loadgen import LoadResult
from gateway.bench.scenarios import CLASSIFY, BenchContext, ScenarioResult, model_dir, run_baseline, scenario, \
    served_model_flags
from gateway.bench.texts import unique_texts, write_lines

__all__ = ["miss_capacity", "bare_forward", "MISS_80_SHARE", "OVERLOAD_FACTOR", "RECOVERY_CALLS"]

MISS_80_SHARE = 0.8
OVERLOAD_FACTOR = 2.0
IDLE_WARMUP_CALLS = 5
RECOVERY_CALLS = 20
PROBE_S = 5.0            # the capacity probe, when the miss scenario did not run
SENDERS_PER_RPS = 0.5    # miss-80: senders = offered calls/s x 0.5 s of latency (64..512)
KEEP_UP = 0.9            # an offered rate reached below this share of the asked one gets a note


def miss_capacity(ctx: BenchContext) -> float:
    """Texts/s of closed-loop misses at --miss-concurrency: from the miss
    scenario of this run, else measured now by a short probe."""
    if ctx.miss_capacity:
        return ctx.miss_capacity
    cfg = ctx.config
    duration = min(cfg.duration_s, PROBE_S)
    spec = ctx.spec(CLASSIFY, ctx.fresh("probe"), unique=True, concurrency=cfg.miss_concurrency,
                    connections=min(cfg.connections, cfg.miss_concurrency), duration_s=duration, rps=None)
    ctx.log(f"  measuring the miss capacity first (the miss scenario did not run): {duration:g}s closed loop")
    res = ctx.run_load(ctx.tiergate, spec)
    if not res.texts_per_s > 0:
        raise RuntimeError(f"the miss capacity probe served nothing (errors: {res.errors})")
    ctx.miss_capacity = res.texts_per_s
    ctx.miss_capacity_from = f"a {duration:g}s probe (c={spec.concurrency}, {res.generator})"
    return ctx.miss_capacity


def _sequential(ctx: BenchContext, texts: str, calls: int):
    return ctx.spec(CLASSIFY, texts, unique=True, concurrency=1, connections=1, duration_s=None, requests=calls,
                    rps=None)


@scenario("miss-idle", "Classify, one caller, one new text at a time (vs one bare forward pass of the model)")
def miss_idle(ctx: BenchContext, name: str, about: str) -> ScenarioResult:
    cfg = ctx.config
    warm_key, key = ctx.fresh("idle-warm"), ctx.fresh("idle")
    spec = _sequential(ctx, key, cfg.idle_calls)
    res = ctx.measure(name, f"Classify, one caller, {cfg.idle_calls} new texts one at a time", ctx.tiergate, spec,
                      [_sequential(ctx, warm_key, IDLE_WARMUP_CALLS)])
    # The same texts, in the same order, as the gateway just scored (warm-ups first).
    lines = {k: ctx.files[k].read_text(encoding="utf-8").splitlines() for k in (warm_key, key)}
    texts = unique_texts(lines[warm_key], IDLE_WARMUP_CALLS) + unique_texts(lines[key], cfg.idle_calls)
    try:
        res.extras["bare_forward"] = bare_forward(ctx, texts, IDLE_WARMUP_CALLS)
    except Exception as exc:  # the row stands without its baseline
        res.notes.append(f"the bare forward baseline failed: {exc}")
    return res


def bare_forward(ctx: BenchContext, texts: list[str], warmup: int) -> dict:
    """One text at a time through the project's own loader, in a child process
    (torch stays out of bench), at the precision and device the stack serves."""
    cfg = ctx.config
    stats = ctx.stats or {}
    dtype, device = stats.get("model_dtype") or "", stats.get("model_device") or ""
    path = write_lines(ctx.workdir / "bare-forward.txt", texts)
    argv = [sys.executable, "-m", "inference.pipeline_baseline", "--model", model_dir(cfg.model),
            "--texts", str(path), "--bare-forward", str(len(texts) - warmup), "--warmup", str(warmup),
            *served_model_flags(ctx)]
    ctx.log(f"  bare forward: {len(texts) - warmup} single texts, {dtype or 'float32'}"
            f"{', ' + device if device else ''} (stack idle)")
    out = run_baseline(ctx, argv, "bare_forward.log", timeout_s=1800)
    out["argv"] = argv
    out["stack_dtype"] = dtype or None
    return out


@scenario("miss-80", "Classify, new texts, open loop at 80% of the measured miss capacity")
def miss_80(ctx: BenchContext, name: str, about: str) -> ScenarioResult:
    cfg = ctx.config
    capacity = miss_capacity(ctx)
    rate = MISS_80_SHARE * capacity
    senders = min(512, max(64, math.ceil(rate * SENDERS_PER_RPS)))
    spec = ctx.spec(CLASSIFY, ctx.fresh("80"), unique=True, rps=rate, concurrency=senders,
                    connections=min(cfg.connections, senders), timeout_s=cfg.call_timeout_s)
    res = ctx.measure(name, f"Classify, new texts, open loop at {rate:,.0f} calls/s (80% of {capacity:,.0f})",
                      ctx.tiergate, spec, [])
    res.extras.update(capacity_texts_per_s=round(capacity, 2), capacity_from=ctx.miss_capacity_from,
                      offered_rps=round(rate, 2), senders=senders)
    _rate_notes(res, rate)
    return res


@scenario("overload", "Classify, new texts, open loop at 2x the measured miss capacity for --overload-duration "
          "(Python generator: refusal latency per status code), then a recovery probe")
def overload(ctx: BenchContext, name: str, about: str) -> ScenarioResult:
    cfg = ctx.config
    capacity = miss_capacity(ctx)
    rate = OVERLOAD_FACTOR * capacity
    spec = ctx.spec(CLASSIFY, ctx.fresh("overload"), unique=True, rps=rate, concurrency=cfg.overload_concurrency,
                    duration_s=cfg.overload_duration_s, timeout_s=cfg.call_timeout_s)
    probe = _sequential(ctx, ctx.fresh("recovery"), RECOVERY_CALLS)

    def recover(res: ScenarioResult) -> None:
        # Right after the overload: the generator has returned, so every call of it has ended.
        try:
            res.extras["recovery"] = asdict(ctx.run_load(ctx.tiergate, probe))
        except Exception as exc:
            res.extras["recovery"] = {"error": str(exc)}
            res.notes.append(f"the recovery probe failed: {exc}")

    res = ctx.measure(name, f"Classify, new texts, open loop at {rate:,.0f} calls/s (2x {capacity:,.0f}) for "
                      f"{cfg.overload_duration_s:g}s, then {RECOVERY_CALLS} sequential new texts", ctx.tiergate,
                      spec, [], prefer="python", then=recover)
    load = res.load
    res.extras.update(capacity_texts_per_s=round(capacity, 2), capacity_from=ctx.miss_capacity_from,
                      offered_rps=round(rate, 2), call_timeout_s=cfg.call_timeout_s,
                      refused=load.errors.get("RESOURCE_EXHAUSTED", 0),
                      refused_latency_ms=(load.error_latency_ms or {}).get("RESOURCE_EXHAUSTED"),
                      other_errors={k: v for k, v in load.errors.items()
                                    if k not in ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")},
                      hung=load.hung)
    _rate_notes(res, rate)
    return res


def _rate_notes(res: ScenarioResult, rate: float) -> None:
    """Say so when the generator did not offer the asked rate, or the server did not keep up with it."""
    load: LoadResult = res.load
    if load.sent_per_s is not None and load.sent_per_s < KEEP_UP * rate:
        lag = (load.send_lag_ms or {}).get("p99")
        res.notes.append(f"the generator offered only {load.sent_per_s:,.0f} of {rate:,.0f} calls/s asked"
                         + (f" (send lag p99 {lag:,.0f} ms)" if lag is not None else "")
                         + ": the load was lighter than meant")
    elif load.sent_per_s is not None:
        res.notes.append(f"offered {load.sent_per_s:,.0f} calls/s of {rate:,.0f} asked "
                         f"(send lag p99 {(load.send_lag_ms or {}).get('p99', 0):,.1f} ms)")
    if res.name == "miss-80" and load.calls_per_s < KEEP_UP * rate:
        res.notes.append(f"served {load.calls_per_s:,.0f} of {rate:,.0f} offered calls/s: 80% of the closed-loop "
                         "capacity was more than the stack sustained open loop in this run")
