"""What a bench run leaves behind: the table on stdout, bench.json, and the
latency-vs-offered-load PNG (when matplotlib is installed)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from gateway.bench.scenarios import OPEN_LOOP_RPS, ScenarioResult
from gateway.bench.targets import TIER_KEYS

__all__ = ["ratios", "render_table", "write_json", "draw_latency_png", "miss_lines", "classify_lines", "PNG_NAME"]

PNG_NAME = "hit_unary_latency.png"
COLUMNS = ("scenario", "target", "calls/s", "texts/s", "p50 ms", "p95 ms", "p99 ms", "errors", "tier hits",
           "RSS MB", "ratio")


def _by_name(results: list[ScenarioResult]) -> dict[str, ScenarioResult]:
    return {r.name: r for r in results if r.error is None}


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def ratios(results: list[ScenarioResult]) -> dict[str, float]:
    """Ratios between figures measured in this one run (the machine is shared
    and noisy; figures from different runs do not compare)."""
    r = _by_name(results)

    def get(name: str, attr: str) -> float | None:
        return getattr(r[name], attr) if name in r else None

    out = {
        "hit_unary_calls_vs_gostub_calls": _ratio(get("hit-unary", "calls_per_s"), get("gostub", "calls_per_s")),
        "hit_unary_calls_vs_trivial_aio_calls": _ratio(get("hit-unary", "calls_per_s"),
                                                       get("trivial-aio", "calls_per_s")),
        "hit_batch_texts_vs_gostub_calls": _ratio(get("hit-batch", "texts_per_s"), get("gostub", "calls_per_s")),
        "miss_texts_vs_pipeline_texts": _ratio(get("miss", "texts_per_s"), get("pipeline", "texts_per_s")),
        "miss_texts_vs_model_alone_texts": _ratio(get("miss", "texts_per_s"),
                                                  ((r["miss"].extras.get("model_alone") or {}).get("texts_per_s")
                                                   if "miss" in r else None)),
        "tiergate_rss_vs_pipeline_rss": _ratio(get("miss", "rss_mb"), get("pipeline", "rss_mb")),
    }
    idle, m80 = r.get("miss-idle"), r.get("miss-80")
    if idle is not None and idle.load is not None:
        bare = idle.extras.get("bare_forward") or {}
        out["miss_idle_p50_vs_bare_forward_p50"] = _ratio(idle.load.p50_ms, bare.get("p50_ms"))
    if m80 is not None and m80.load is not None:
        out["miss_80_p99_vs_p50"] = _ratio(m80.load.p99_ms, m80.load.p50_ms)
    fig = r["classify"].extras.get("figures") or {} if "classify" in r else {}
    for key in ("cold_vs_fair_script", "warm_vs_fair_script", "target_rows_vs_miss_texts"):
        out[f"classify_{key}"] = fig.get(key)
    return {k: round(v, 4) for k, v in out.items() if v is not None}


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _errors(res: ScenarioResult) -> str:
    if res.load is None:
        return "-"
    return " ".join(f"{code}={n}" for code, n in sorted(res.load.errors.items())) or "0"


def _tiers(res: ScenarioResult) -> str:
    if res.counters is None:
        return "-" if res.target == "tiergate" else "n/a"
    counts = [(label, res.counters.get(key, 0)) for label, key in TIER_KEYS]
    total = sum(n for _, n in counts)
    if not total:
        return "none"
    return " ".join(f"{label} {100 * n / total:.3g}%" for label, n in counts if n)


def _rss(res: ScenarioResult) -> str:
    mb = res.rss_mb
    return "n/a" if mb is None else f"{mb:,.0f}"


def _ratio_cell(res: ScenarioResult, rat: dict[str, float]) -> str:
    def x(key: str, what: str) -> str | None:
        return f"{rat[key]:.2f}x {what}" if key in rat else None

    cells = {
        "hit-unary": [x("hit_unary_calls_vs_gostub_calls", "gostub"), x("hit_unary_calls_vs_trivial_aio_calls", "aio")],
        "hit-batch": [x("hit_batch_texts_vs_gostub_calls", "gostub calls/s")],
        "miss": [x("miss_texts_vs_pipeline_texts", "pipeline")],
        "pipeline": [x("tiergate_rss_vs_pipeline_rss", "RSS: tiergate/pipeline")],
        "miss-idle": [x("miss_idle_p50_vs_bare_forward_p50", "bare forward p50")],
        "miss-80": [f"p99/p50 {rat['miss_80_p99_vs_p50']:.2f}x" if "miss_80_p99_vs_p50" in rat else None],
        "overload": [_overload_cell(res)],
        "classify": [_classify_cell(rat)],
    }.get(res.name, [])
    return ", ".join(c for c in cells if c)


def _classify_cell(rat: dict[str, float]) -> str | None:
    times = [f"{rat[k]:.2f}x {what}" for k, what in (("classify_cold_vs_fair_script", "cold"),
                                                     ("classify_warm_vs_fair_script", "warm")) if k in rat]
    parts = [", ".join(times) + " vs fair script"] if times else []
    if "classify_target_rows_vs_miss_texts" in rat:
        parts.append(f"--target {rat['classify_target_rows_vs_miss_texts']:.2f}x miss")
    return ", ".join(parts) or None


def _overload_cell(res: ScenarioResult) -> str | None:
    lat = res.extras.get("refused_latency_ms")
    hung = res.extras.get("hung")
    parts = [f"refused p99 {_num(lat['p99'])} ms" if lat else None, None if hung is None else f"hung {hung}"]
    return ", ".join(p for p in parts if p) or None


def miss_lines(results: list[ScenarioResult]) -> list[str]:
    """What the miss-path rows rest on: the capacity they scale from, the bare
    forward baseline, the overload's offered load and the recovery probe."""
    r = _by_name(results)
    out = []
    for name in ("miss-80", "overload"):
        res = r.get(name)
        if res is not None and res.extras.get("capacity_texts_per_s"):
            out.append(f"miss capacity (closed loop, texts/s) behind miss-80 and overload: "
                       f"{_num(res.extras['capacity_texts_per_s'])}, from {res.extras.get('capacity_from')}")
            break
    miss = r.get("miss")
    cpu = miss.extras.get("cpu_per_text") if miss else None
    if cpu:
        parts = ", ".join(f"{name} {ms:.2f}" for name, ms in cpu["ms_per_text"].items())
        out.append(f"CPU per miss (ms of a core per text, {cpu['texts']} texts, {cpu['cores_busy']} cores busy): "
                   f"{parts}; total {cpu['total_ms_per_text']:.2f}, the stack's share "
                   f"{cpu['stack_share']:.0%}"
                   + (f"; {cpu['texts_per_message']:.2f} texts per stream message to the model"
                      if cpu.get("texts_per_message") else ""))
    alone = miss.extras.get("model_alone") if miss else None
    if alone:
        share = f"; miss = {miss.texts_per_s / alone['texts_per_s']:.0%} of it" if miss.texts_per_s else ""
        out.append(f"model alone (the miss scenario's ceiling: the served runtime with every lane busy, nothing else; "
                   f"{alone['dtype']} on {alone['device']}, {alone.get('runtime', '?')}, {alone['lanes']} lane(s) x "
                   f"{alone['threads']} thread(s), {alone['texts_per_pass']} texts per pass, grouped by token "
                   f"count within {alone.get('group_window', '?')} texts: padded to {alone.get('padding', '?')}x "
                   f"their tokens): "
                   f"{_num(alone['texts_per_s'])} texts/s{share}")
    idle = r.get("miss-idle")
    bare = idle.extras.get("bare_forward") if idle else None
    if bare:
        out.append(f"bare forward (miss-idle's baseline: the served runtime (inference.runtime), one text per pass, "
                   f"{bare['texts']} texts, {bare['dtype']} on {bare['device']}, {bare.get('runtime', '?')}, "
                   f"{bare.get('threads', '?')} thread(s) per pass): p50 {_num(bare['p50_ms'])} ms, "
                   f"p90 {_num(bare['p90_ms'])} ms, min {_num(bare['min_ms'])} ms")
    over = r.get("overload")
    if over is not None and over.load is not None:
        ld, ex = over.load, over.extras
        lag = ld.send_lag_ms or {}
        out.append(f"overload ({ld.generator}, {ld.seconds:.0f} s, deadline {ex.get('call_timeout_s'):g} s): asked "
                   f"{_num(ex.get('offered_rps'))}/s, sent {_num(ld.sent_per_s)}/s (send lag p99 "
                   f"{_num(lag.get('p99'))} ms); served {_num(ld.calls_per_s)}/s (p50 {_num(ld.p50_ms)}, p99 "
                   f"{_num(ld.p99_ms)} ms); errors {_errors(over)}; peak RSS {_num(over.rss_peak_mb)} MB")
        rec = ex.get("recovery") or {}
        if "ok" in rec:
            out.append(f"recovery after overload ({rec['generator']}, sequential new texts): {rec['ok']} served, "
                       f"errors {sum(rec['errors'].values())}, p50 {_num(rec['p50_ms'])} ms, "
                       f"max {_num(rec['max_ms'])} ms")
    return out


def _counts(summary: dict | None) -> str:
    if not summary:
        return "no summary line"
    names = (("model", "model"), ("l1", "L1"), ("l2", "L2"), ("l3", "L3"), ("errors", "errors"))
    return ", ".join(f"{summary[k]} {label}" for k, label in names if k in summary) or summary["line"][:60]


def classify_lines(results: list[ScenarioResult]) -> list[str]:
    """The classify scenario's parts, one line each, under the table."""
    res = _by_name(results).get("classify")
    if res is None:
        return []
    ex = res.extras
    fig = ex.get("figures") or {}
    fair = (ex.get("script_fair") or {}).get("seconds")

    def vs_fair(part: dict) -> str:
        return f"{part['seconds'] / fair:.2f}x" if fair and "seconds" in part else "-"

    def agree(key: str, other: str) -> str:
        a = fig.get(key)
        return f"; labels agree {a['share']:.1%} with {other}" if a and a["share"] is not None else ""

    rows: list[tuple[str, ...]] = []
    for key, what in (("script_as_written", "pipeline script, as written (no batch_size)"),
                      ("script_fair", "pipeline script, batch_size=8 (fair)"),
                      ("cold", "tiergate classify, cold (embedded, empty L2)"),
                      ("warm", "tiergate classify, warm (same L2)"),
                      ("target", "tiergate classify --target (bench's gateway)")):
        part = ex.get(key) or {}
        if "error" in part or not part:
            rows.append((what, "-", "-", "-", "-", f"failed: {part['error'].splitlines()[0][:80]}" if part else
                         "did not run"))
            continue
        rate = part.get("rows_per_s") or (ex["rows"] / part["seconds"] if part["seconds"] else None)
        if key.startswith("script"):
            note = f"VmHWM {_num(part['vmhwm_mb'])} MB, model load {_num(part['load_seconds'])} s"
        else:
            note = _counts(part.get("summary")) + f", exit {part['returncode']}"
        if key == "cold":
            note += agree("labels_cold_vs_fair_script", "the fair script")
        elif key == "warm":
            note += agree("labels_warm_vs_cold", "cold")
        elif key == "target":
            if part.get("rows_per_s_in_command"):
                note += f"; {_num(part['rows_per_s_in_command'])} rows/s by its own clock"
            note += (f"; {fig['target_rows_vs_miss_texts']:.2f}x the miss capacity "
                     f"({_num(ex['miss_capacity_texts_per_s'])} texts/s, from {ex.get('miss_capacity_from')})"
                     if "target_rows_vs_miss_texts" in fig else "; no miss capacity to compare with")
        peak = "-" if key == "target" else _num(part["peak_tree_rss_mb"])  # --target: a client; the gateway is bench's
        rows.append((what, _num(part["seconds"]), _num(rate), peak, "-" if key == "target" else vs_fair(part), note))
    head = ("classify run", "seconds", "rows/s", "peak RSS MB", "vs fair", "")
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(5)]
    out = [f"classify: {ex.get('rows')} CSV rows, {ex.get('words_mean')} words on average (seconds from process "
           f"start: scripts until their output exists, tiergate until it exits; peak RSS summed over the process "
           f"tree, sampled every {ex.get('rss_sample_s', 0) * 1000:.0f} ms)"]
    for r in [head] + rows:
        out.append("  " + "  ".join([r[0].ljust(widths[0])] + [c.rjust(widths[i]) for i, c in enumerate(r[1:5], 1)]
                                    + [r[5]]).rstrip())
    if "rss_peak_minus_fair_script_mb" in fig:
        out.append(f"  peak RSS tiergate (larger of cold, warm) minus the fair script: "
                   f"{fig['rss_peak_minus_fair_script_mb']:+,.0f} MB")
    return out


def render_table(results: list[ScenarioResult], *, header: list[str], footer: list[str]) -> str:
    rat = ratios(results)
    rows = []
    for res in results:
        if res.error is not None:
            rows.append((res.name, res.target, f"failed: {res.error.splitlines()[0][:100]}"))
            continue
        load = res.load
        rows.append((res.name, res.target, _num(res.calls_per_s), _num(res.texts_per_s),
                     _num(load.p50_ms if load else None), _num(load.p95_ms if load else None),
                     _num(load.p99_ms if load else None), _errors(res), _tiers(res), _rss(res), _ratio_cell(res, rat)))
    full = [r for r in rows if len(r) == len(COLUMNS)]
    widths = [max([len(c)] + [len(r[i]) for r in full]) for i, c in enumerate(COLUMNS)]
    right = {2, 3, 4, 5, 6, 9}  # numbers line up on the right

    def line(cells) -> str:
        if len(cells) != len(COLUMNS):  # a failed scenario: its message runs across the row
            return "  ".join([cells[0].ljust(widths[0]), cells[1].ljust(widths[1]), cells[2]])
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip()

    body = [line(COLUMNS), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    return "\n".join(header + body + footer)


def ratio_legend(results: list[ScenarioResult]) -> list[str]:
    out = []
    rat = ratios(results)
    if any(k in rat for k in ("hit_unary_calls_vs_gostub_calls", "hit_unary_calls_vs_trivial_aio_calls")):
        out.append("ratio on hit-unary: its calls/s over the baseline's calls/s (same client, same run)")
    if "hit_batch_texts_vs_gostub_calls" in rat:
        out.append("ratio on hit-batch: its texts/s over gostub's unary calls/s")
    if "miss_texts_vs_pipeline_texts" in rat:
        out.append("ratio on miss: its texts/s over the pipeline baseline's texts/s (same texts)")
    if "tiergate_rss_vs_pipeline_rss" in rat:
        out.append("ratio on pipeline: tiergate's summed RSS (end of miss) over the pipeline process's RSS")
    if "miss_idle_p50_vs_bare_forward_p50" in rat:
        out.append("ratio on miss-idle: its p50 over one bare forward pass's p50 (same model, precision, texts)")
    if any(k.startswith("classify_") for k in rat):
        out.append("ratio on classify: tiergate classify's wall time over the pipeline script's (batch_size=8), "
                   "and --target rows/s over the miss texts/s")
    if "overload" in _by_name(results):
        out.append("overload: latencies of served calls from the scheduled send, of refused ones from the actual "
                   "send; hung = calls that reached the client deadline")
    return out


def open_loop_line(results: list[ScenarioResult]) -> str | None:
    res = _by_name(results).get("hit-unary-1000rps")
    if res is None or res.load is None:
        return None
    return (f"hit-unary at {OPEN_LOOP_RPS} offered calls/s (open loop, {res.load.generator}): "
            f"p50 {_num(res.load.p50_ms)} ms, p99 {_num(res.load.p99_ms)} ms, achieved {_num(res.calls_per_s)}/s")


def result_dict(res: ScenarioResult) -> dict:
    d = {"name": res.name, "target": res.target, "about": res.about, "error": res.error, "notes": res.notes,
         "calls_per_s": res.calls_per_s, "texts_per_s": res.texts_per_s,
         "load": asdict(res.load) if res.load else None, "warm": [asdict(w) for w in res.warm],
         "counters": res.counters, "rss": res.rss.as_dict() if res.rss else None, "rss_mb": res.rss_mb,
         "rss_peak_mb": res.rss_peak_mb, "pipeline": res.pipeline, "extras": res.extras}
    if res.counters is not None:
        d["tier_hits"] = {label: res.counters.get(key, 0) for label, key in TIER_KEYS}
    return d


def write_json(path: Path, doc: dict, results: list[ScenarioResult], checks: list | None = None) -> Path:
    doc = {**doc, "scenarios": [result_dict(r) for r in results], "ratios": ratios(results)}
    if checks is not None:
        doc["targets"] = [c.as_dict() for c in checks]
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def draw_latency_png(path: Path, sweep: dict, title: str) -> str:
    """Returns a one-line message saying what was drawn or why not."""
    points = sweep.get("points") or []
    if not points:
        return "no latency sweep ran: no PNG"
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display here
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed (pip install -e '.[bench]'): skipped {path.name}"
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    offered = [p["offered_rps"] for p in points]
    for key, label, style in (("p50_ms", "p50", "o-"), ("p95_ms", "p95", "s-"), ("p99_ms", "p99", "^-")):
        ys = [p[key] for p in points]
        ax.plot(offered, ys, style, label=label)
    for p in points:
        if p.get("behind"):
            ax.axvline(p["offered_rps"], color="grey", linestyle=":", linewidth=1)
            # x in data, y in axes coordinates: the note sits at the bottom, clear of the lines.
            ax.text(p["offered_rps"], 0.03, f"behind: achieved {p['achieved_rps']:,.0f}/s ", ha="right",
                    fontsize=8, color="grey", transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(offered)
    ax.set_xticklabels([f"{o:,.0f}" for o in offered])
    ax.minorticks_off()
    ax.set_xlabel("offered load, calls/s (open loop)")
    ax.set_ylabel("latency from scheduled send, ms")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"wrote {path}"
