"""What a bench run leaves behind: the table on stdout, bench.json, and the
latency-vs-offered-load PNG (when matplotlib is installed)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from gateway.bench.scenarios import OPEN_LOOP_RPS, ScenarioResult
from gateway.bench.targets import TIER_KEYS

__all__ = ["ratios", "render_table", "write_json", "draw_latency_png", "PNG_NAME"]

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
        "tiergate_rss_vs_pipeline_rss": _ratio(get("miss", "rss_mb"), get("pipeline", "rss_mb")),
    }
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
    }.get(res.name, [])
    return ", ".join(c for c in cells if c)


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
         "rss_peak_mb": res.rss_peak_mb, "pipeline": res.pipeline}
    if res.counters is not None:
        d["tier_hits"] = {label: res.counters.get(key, 0) for label, key in TIER_KEYS}
    return d


def write_json(path: Path, doc: dict, results: list[ScenarioResult]) -> Path:
    doc = {**doc, "scenarios": [result_dict(r) for r in results], "ratios": ratios(results)}
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
