"""The miss path's targets, checked against what this one run measured.

Each check is a measured value, the target and PASS/FAIL (or n/a when a part
it needs did not run), printed as the "targets" section under the table and
kept in bench.json. The targets (one run on this 2-core machine, default model):

- miss throughput (c=32, new texts) >= 4x the pipeline baseline's texts/s on
  a CPU with AVX-512 VNNI, >= 3x on an AVX2-only one (issue 12), and >= 85%
  of the model alone in the served configuration (below);
- a single miss at idle: p50 <= 1.3x one bare forward pass of one text;
- at 80% of the measured miss capacity (open loop): p99 <= 4x p50;
- overload (2x capacity): refusals (RESOURCE_EXHAUSTED) within 50 ms, no other
  errors, no call reaching its deadline, and a recovery probe right after that
  is all served at about the miss-idle latency;
- the summed RSS of the tiergate processes at the end of miss <= the pipeline
  process's RSS (issue 12), and its peaks (during miss, during the overload)
  <= the pipeline's + 150 MB.

And the CSV job (issue 10; checked when the classify scenario is in the run):

- `tiergate classify` cold (embedded stack, empty L2) <= 0.45x the wall time
  of the pipeline script made fair (batch_size=8), warm (every row in L2)
  <= 0.1x;
- `tiergate classify --target` rows/s >= 90% of the miss texts/s;
- its peak RSS (whole process tree, the larger of cold and warm) <= the fair
  script's + 100 MB;
- and its output is the script's: the same rows, 0 errors, the same label on
  at least 95% of rows (int8 against float32 flips a few close calls).

The stack's own efficiency (issue 12; with --compare): miss texts/s >= 85%
of the model alone in the served configuration (every lane busy, no gRPC,
queue or cache: inference.pipeline_baseline --model-alone).

And metrics (issue 11; checked when the metrics-cost scenario is in the run):
hit-unary with metrics on >= 0.95x the same with metrics off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gateway.bench.scenarios import ScenarioResult

__all__ = ["Check", "check_targets", "render_targets"]

MISS_VS_PIPELINE_AVX512 = 4.0  # issue 12: on a CPU with AVX-512 VNNI, whatever the served precision
MISS_VS_PIPELINE_AVX2 = 3.0    # and on an AVX2-only one
IDLE_VS_BARE = 1.3
MISS_80_TAIL = 4.0
REFUSAL_MS = 50.0
RSS_OVER_PIPELINE_MB = 150.0   # the peaks (issue 4)
RSS_END_OVER_PIPELINE_MB = 0.0  # at the end of miss (issue 12): no more than the pipeline process
RECOVERY_VS_IDLE = 2.0   # "served normally": our reading, p50 within 2x the miss-idle p50
CLASSIFY_COLD_VS_SCRIPT = 0.45
CLASSIFY_WARM_VS_SCRIPT = 0.1
CLASSIFY_TARGET_VS_MISS = 0.9
CLASSIFY_RSS_OVER_SCRIPT_MB = 100.0
CLASSIFY_LABELS_AGREE = 0.95   # "the same labels on most rows": our reading
METRICS_ON_VS_OFF = 0.95
MISS_VS_MODEL_ALONE = 0.85


@dataclass(frozen=True)
class Check:
    key: str
    what: str
    value: str              # the measured figure(s), as printed
    target: str
    ok: bool | None         # None: not measured in this run (what is missing is in value)

    @property
    def verdict(self) -> str:
        return "n/a" if self.ok is None else "PASS" if self.ok else "FAIL"

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def _f(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    text = f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"
    return text + unit


def _missing(key: str, what: str, target: str, needs: str) -> Check:
    return Check(key, what, f"not measured (needs {needs})", target, None)


def cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            return "avx512_vnni" in fh.read()
    except OSError:
        return False


def check_targets(results: list[ScenarioResult], model_dtype: str | None, *,
                  vnni: bool | None = None) -> list[Check]:
    """vnni: whether this CPU has AVX-512 VNNI (None: read /proc/cpuinfo); the miss bar depends on it."""
    r = {res.name: res for res in results if res.error is None}
    miss, pipe, idle, m80, over = (r.get(n) for n in ("miss", "pipeline", "miss-idle", "miss-80", "overload"))
    checks: list[Check] = []

    # Throughput against the pipeline loop; the bar depends on the CPU's kind.
    vnni = cpu_has_vnni() if vnni is None else vnni
    bar = MISS_VS_PIPELINE_AVX512 if vnni else MISS_VS_PIPELINE_AVX2
    target = f">= {bar:g}x ({'AVX-512 VNNI' if vnni else 'AVX2 only'}; stack {model_dtype or '?'})"
    if miss and pipe and miss.texts_per_s and pipe.texts_per_s:
        ratio = miss.texts_per_s / pipe.texts_per_s
        value = f"{ratio:.2f}x ({_f(miss.texts_per_s)} vs {_f(pipe.texts_per_s)} texts/s)"
        checks.append(Check("miss_vs_pipeline", "miss texts/s vs pipeline", value, target, ratio >= bar))
    else:
        checks.append(_missing("miss_vs_pipeline", "miss texts/s vs pipeline", target, "miss + pipeline (--compare)"))

    target = f">= {MISS_VS_MODEL_ALONE:.0%}"
    alone = (miss.extras.get("model_alone") if miss else None) or {}
    if miss and miss.texts_per_s and alone.get("texts_per_s"):
        share = miss.texts_per_s / alone["texts_per_s"]
        value = (f"{share:.0%} ({_f(miss.texts_per_s)} vs {_f(alone['texts_per_s'])} texts/s, {alone.get('runtime')} "
                 f"{alone.get('lanes')}x{alone.get('threads')}, {alone.get('texts_per_pass')} per pass)")
        checks.append(Check("miss_vs_model_alone", "miss texts/s vs the model alone", value, target,
                            share >= MISS_VS_MODEL_ALONE))
    else:
        checks.append(_missing("miss_vs_model_alone", "miss texts/s vs the model alone", target,
                               "miss with --compare"))

    target = f"<= {IDLE_VS_BARE:g}x"
    bare = (idle.extras.get("bare_forward") if idle else None) or {}
    if idle and idle.load and idle.load.p50_ms and bare.get("p50_ms"):
        ratio = idle.load.p50_ms / bare["p50_ms"]
        value = f"{ratio:.2f}x ({_f(idle.load.p50_ms)} vs {_f(bare['p50_ms'])} ms, bare {bare.get('dtype')})"
        checks.append(Check("idle_vs_bare_forward", "miss-idle p50 vs bare forward p50", value, target,
                            ratio <= IDLE_VS_BARE))
    else:
        checks.append(_missing("idle_vs_bare_forward", "miss-idle p50 vs bare forward p50", target,
                               "miss-idle and its bare forward run"))

    target = f"<= {MISS_80_TAIL:g}x"
    if m80 and m80.load and m80.load.p50_ms and m80.load.p99_ms:
        ratio = m80.load.p99_ms / m80.load.p50_ms
        value = f"{ratio:.2f}x (p99 {_f(m80.load.p99_ms)} / p50 {_f(m80.load.p50_ms)} ms at " \
                f"{_f(m80.extras.get('offered_rps'))}/s)"
        checks.append(Check("miss_80_tail", "miss-80 p99 / p50", value, target, ratio <= MISS_80_TAIL))
    else:
        checks.append(_missing("miss_80_tail", "miss-80 p99 / p50", target, "miss-80"))

    checks += _overload_checks(over, idle)
    checks += _rss_checks(miss, over, pipe)
    if any(res.name == "classify" for res in results):  # its bars only where it was asked for
        checks += _classify_checks(r.get("classify"))
    if any(res.name == "metrics-cost" for res in results):
        checks.append(_metrics_check(r.get("metrics-cost")))
    return checks


def _metrics_check(res: ScenarioResult | None) -> Check:
    what, target = "hit-unary calls/s, metrics on vs off", f">= {METRICS_ON_VS_OFF:g}x"
    ratio = res.extras.get("ratio") if res else None
    if ratio is None:
        return _missing("metrics_on_vs_off", what, target, "metrics-cost")
    on, off = res.extras["on_calls_per_s"], res.extras["off_calls_per_s"]
    value = (f"{ratio:.3f}x (medians of {res.extras['rounds']} alternating rounds: "
             f"{_f(sorted(on)[len(on) // 2])} vs {_f(sorted(off)[len(off) // 2])} calls/s)")
    return Check("metrics_on_vs_off", what, value, target, ratio >= METRICS_ON_VS_OFF and not res.extras["errors"])


def _overload_checks(over: ScenarioResult | None, idle: ScenarioResult | None) -> list[Check]:
    keys = (("overload_refusals", "overload: RESOURCE_EXHAUSTED latency", f"max <= {REFUSAL_MS:g} ms"),
            ("overload_errors", "overload: other errors", "0"),
            ("overload_hung", "overload: hung calls (client deadline)", "0"),
            ("overload_recovery", "after overload: sequential new texts", "all served, p50 near miss-idle"))
    if over is None or over.load is None:
        return [_missing(k, w, t, "overload") for k, w, t in keys]
    load, ex = over.load, over.extras
    out = []
    lat, refused = ex.get("refused_latency_ms") or {}, ex.get("refused", 0)
    served = f"served {_f(load.calls_per_s)}/s of {_f(ex.get('offered_rps'))}/s offered"
    if refused and lat:
        value = f"{refused} refused: p50 {_f(lat.get('p50'))} / p99 {_f(lat.get('p99'))} / max {_f(lat.get('max'))} ms"
        out.append(Check(keys[0][0], keys[0][1], value, keys[0][2], lat.get("max", 1e9) <= REFUSAL_MS))
    else:
        out.append(Check(keys[0][0], keys[0][1], f"none refused ({served})", keys[0][2], None))
    other = ex.get("other_errors") or {}
    value = (" ".join(f"{k}={v}" for k, v in sorted(other.items())) or "0") + f" ({served})"
    out.append(Check(keys[1][0], keys[1][1], value, keys[1][2], not other and load.ok > 0))
    hung = ex.get("hung")
    out.append(Check(keys[2][0], keys[2][1], "unknown (generator does not report it)" if hung is None else
                     f"{hung} (deadline {_f(ex.get('call_timeout_s'))} s)", keys[2][2],
                     None if hung is None else hung == 0))
    rec = ex.get("recovery") or {}
    if "ok" not in rec:
        out.append(Check(keys[3][0], keys[3][1], f"probe failed: {rec.get('error', 'did not run')}", keys[3][2], False))
    else:
        errors = sum(rec["errors"].values())
        idle_p50 = idle.load.p50_ms if idle and idle.load else None
        value = f"{rec['ok']}/{rec['ok'] + errors} served, p50 {_f(rec['p50_ms'])} ms"
        ok = errors == 0 and rec["ok"] > 0
        target = keys[3][2]
        if idle_p50 and rec["p50_ms"] is not None:
            value += f" vs miss-idle {_f(idle_p50)} ms"
            target = f"all served, p50 <= {RECOVERY_VS_IDLE:g}x miss-idle"
            ok = ok and rec["p50_ms"] <= RECOVERY_VS_IDLE * idle_p50
        out.append(Check(keys[3][0], keys[3][1], value, target, ok))
    return out


def _rss_checks(miss: ScenarioResult | None, over: ScenarioResult | None, pipe: ScenarioResult | None) -> list[Check]:
    pipe_mb = pipe.rss_mb if pipe else None
    out = []
    for key, what, res, mb, over_mb in (
        ("rss_miss", "RSS: tiergate at the end of miss", miss, miss.rss_mb if miss else None, RSS_END_OVER_PIPELINE_MB),
        ("rss_miss_peak", "RSS: tiergate peak during miss", miss, miss.rss_peak_mb if miss else None,
         RSS_OVER_PIPELINE_MB),
        ("rss_overload_peak", "RSS: tiergate peak during overload", over, over.rss_peak_mb if over else None,
         RSS_OVER_PIPELINE_MB),
    ):
        target = f"<= pipeline + {over_mb:g} MB" if over_mb else "<= pipeline"
        if res is None or not mb or not pipe_mb:
            needs = ("miss" if "miss" in key else "overload") + " + pipeline (--compare), RSS measurable"
            out.append(_missing(key, what, target, needs))
            continue
        diff = mb - pipe_mb
        out.append(Check(key, what, f"{'+' if diff >= 0 else ''}{diff:,.0f} MB ({mb:,.0f} vs {pipe_mb:,.0f} MB)",
                         target, diff <= over_mb))
    return out


def _classify_checks(res: ScenarioResult | None) -> list[Check]:
    ex = res.extras if res else {}
    fig = ex.get("figures") or {}
    fair = ex.get("script_fair") or {}
    out = []
    for key, what, part, bar in (("classify_cold", "classify cold (embedded, empty L2) vs fair script", "cold",
                                  CLASSIFY_COLD_VS_SCRIPT),
                                 ("classify_warm", "classify warm (every row in L2) vs fair script", "warm",
                                  CLASSIFY_WARM_VS_SCRIPT)):
        ratio, own = fig.get(f"{part}_vs_fair_script"), ex.get(part) or {}
        if ratio is None:
            out.append(_missing(key, what, f"<= {bar:g}x", f"classify {part} + the fair script"))
            continue
        value = f"{ratio:.2f}x ({_f(own['seconds'], ' s')} vs {_f(fair['seconds'], ' s')})"
        out.append(Check(key, what, value, f"<= {bar:g}x", ratio <= bar))

    what, target = "classify --target rows/s vs miss texts/s", f">= {CLASSIFY_TARGET_VS_MISS:.0%}"
    ratio, own = fig.get("target_rows_vs_miss_texts"), ex.get("target") or {}
    if ratio is None:
        out.append(_missing("classify_target", what, target, "classify --target + the miss capacity"))
    else:
        value = f"{ratio:.0%} ({_f(own['rows_per_s'])} rows/s vs {_f(ex['miss_capacity_texts_per_s'])} texts/s)"
        out.append(Check("classify_target", what, value, target, ratio >= CLASSIFY_TARGET_VS_MISS))

    what, target = "classify peak RSS (process tree) vs fair script", f"<= script + {CLASSIFY_RSS_OVER_SCRIPT_MB:g} MB"
    diff = fig.get("rss_peak_minus_fair_script_mb")
    if diff is None:
        out.append(_missing("classify_rss", what, target, "classify cold or warm + the fair script"))
    else:
        value = f"{'+' if diff >= 0 else ''}{diff:,.0f} MB ({fig['tiergate_peak_rss_mb']:,.0f} vs " \
                f"{fair['peak_tree_rss_mb']:,.0f} MB)"
        out.append(Check("classify_rss", what, value, target, diff <= CLASSIFY_RSS_OVER_SCRIPT_MB))

    what = "classify output vs the script's"
    target = f"same rows, 0 errors, labels agree >= {CLASSIFY_LABELS_AGREE:.0%}"
    agree = fig.get("labels_cold_vs_fair_script")
    if agree is None or agree["share"] is None:
        out.append(_missing("classify_output", what, target, "classify cold + the fair script"))
    else:
        errors = sum(fig.get(f"{k}_errors", 0) for k in ("cold", "warm", "target"))
        same_rows = agree["rows_a"] == agree["rows_b"] == agree["common"]
        value = f"rows {agree['rows_a']}/{agree['rows_b']}, {errors} errors, labels agree {agree['share']:.1%}"
        out.append(Check("classify_output", what, value, target,
                         same_rows and errors == 0 and agree["share"] >= CLASSIFY_LABELS_AGREE))
    return out


def render_targets(checks: list[Check]) -> list[str]:
    if not checks:
        return []
    w = [max(len(c.what) for c in checks), max(len(c.value) for c in checks), max(len(c.target) for c in checks)]
    lines = ["targets (this run; the issue's bars):"]
    for c in checks:
        lines.append(f"  {c.verdict:<4}  {c.what:<{w[0]}}  {c.value:<{w[1]}}  target {c.target}".rstrip())
    counts = {v: sum(c.verdict == v for c in checks) for v in ("PASS", "FAIL", "n/a")}
    lines.append("  " + ", ".join(f"{n} {v}" for v, n in counts.items() if n))
    return lines
