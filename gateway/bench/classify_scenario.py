"""The classify scenario: the seed documents' CSV job, done by `tiergate
classify` and by the seed documents' own script, in the same run.

One CSV of --classify-rows review-like rows (id, description of 40-60 words
joined from the corpus, points), new to every tier (each description ends
with the run's tag and its row number). Each measured part is a child process
timed from its start; its peak RSS is the summed RSS of its process tree,
sampled every SAMPLE_S (a classify process and its inference child together,
never one process alone):

- script as written: inference.pipeline_csv_baseline --as-written, a
  transformers pipeline called on lists of 8 texts without batch_size (one
  text per forward pass), timed until its output file exists;
- script made fair: the same with batch_size=8;
- cold: `tiergate classify` with an embedded stack and a fresh, empty L2,
  timed until it exits;
- warm: the same command again on the same L2 (every row is in it now);
- --target: `tiergate classify --target` the bench's gateway on a second CSV
  no tier holds, its rows/s against the run's miss capacity (texts/s of the
  miss scenario, or a probe when it did not run).

The figures and their ratios go in the row's extras; goals.py checks them
against the issue's targets and report.classify_lines prints them.
Registered by importing this module (gateway.bench.catalog does).
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.bench.procs import RssSampler
from gateway.bench.scenarios import CLASSIFY, BenchContext, ScenarioResult, model_dir, scenario
from gateway.bench.targets import counter_diff, read_settled_stats
from gateway.bench.texts import corpus_texts, generated_texts, write_lines

__all__ = ["review_rows", "write_rows", "parse_summary", "label_agreement", "classify_figures", "ChildRun",
           "run_child", "COLUMN", "MIN_WORDS", "MAX_WORDS", "SCRIPT_BATCH", "SAMPLE_S"]

COLUMN = "description"
MIN_WORDS, MAX_WORDS = 40, 60   # words per description, the run tag included
SCRIPT_BATCH = 8                # texts per pipeline call, as in the seed documents' script
SAMPLE_S = 0.05                 # RSS sampling interval: a 1 s warm run still gets ~20 samples
POLL_S = 0.01                   # how often the output file and the exit are checked (timing granularity)
CHILD_TIMEOUT_S = 3600.0
GENERATED_TEXTS = 5000          # the pool when the corpus is missing


# --- the input ------------------------------------------------------------------------------------------------------

def review_rows(texts: list[str], count: int, *, seed: int, tag: str) -> list[dict[str, str]]:
    """count rows of id, description, points. Each description joins
    consecutive texts of a seeded shuffle up to a seeded length of MIN_WORDS
    to MAX_WORDS words, the last word being "~TAG-ROW": the same rows for the
    same seed, and none that another run's (or another tag's) caches hold."""
    if not texts:
        raise ValueError("no texts to build rows from")
    rng = random.Random(seed)
    pool = list(texts)
    rng.shuffle(pool)
    rows, position = [], 0
    for i in range(count):
        want = rng.randint(MIN_WORDS, MAX_WORDS) - 1
        words: list[str] = []
        while len(words) < want:
            words += pool[position % len(pool)].split()
            position += 1
        rows.append({"id": str(i + 1), COLUMN: " ".join(words[:want] + [f"~{tag}-{i}"]),
                     "points": str(rng.randint(1, 5))})
    return rows


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _source_texts(seed: int) -> tuple[list[str], str]:
    texts, source = corpus_texts()
    if texts:
        return texts, source
    return generated_texts(GENERATED_TEXTS, seed), f"{GENERATED_TEXTS} generated sentences ({source})"


# --- measuring one child process ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChildRun:
    argv: list[str]
    returncode: int
    exit_s: float               # from just before the process started to its exit
    output_s: float | None      # ... to the output file existing; None: it never did
    peak_tree_mb: float         # summed RSS of the process tree, sampled every SAMPLE_S
    stdout: str
    stderr: str


def run_child(argv: list[str], output: Path, log: Path, *, timeout_s: float = CHILD_TIMEOUT_S,
              env: dict[str, str] | None = None) -> ChildRun:
    """Runs argv to its end with stdin closed, stderr into log, sampling its
    tree's RSS in a thread and checking for `output` every POLL_S."""
    output.unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    stdout_path = log.with_suffix(".stdout")
    output_s = None
    with open(stdout_path, "wb") as out, open(log, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        with RssSampler(proc.pid, interval_s=SAMPLE_S) as sampler:
            while proc.poll() is None:
                now = time.perf_counter()
                if output_s is None and output.exists():
                    output_s = now - t0
                if now - t0 > timeout_s:
                    proc.kill()
                    proc.wait()
                    raise RuntimeError(f"{' '.join(argv[:4])}... ran past {timeout_s:g} s; its log: {log}")
                time.sleep(POLL_S)
            exit_s = time.perf_counter() - t0
    if output_s is None and output.exists():
        output_s = exit_s  # written within the last poll interval
    return ChildRun(argv=argv, returncode=proc.returncode, exit_s=exit_s, output_s=output_s,
                    peak_tree_mb=sampler.peak_mb, stdout=stdout_path.read_text(errors="replace"),
                    stderr=log.read_text(errors="replace"))


# --- reading what the children wrote --------------------------------------------------------------------------------

_SUMMARY = re.compile(r"^classified (\d+) rows in ([\d.]+) s\b.*$", re.M)
# "950 scored by the model, 50 from L1, 0 errors" (the summary line of the contract); the older
# "(950 MODEL, 50 L1)" reads the same.
_COUNT = re.compile(r"(\d+) (scored by the model|model|from L[123]|L[123]|errors?)\b", re.I)


def parse_summary(stderr: str) -> dict | None:
    """The last "classified N rows in S s: ..." line of a classify run: rows,
    seconds and whichever of model, l1, l2, l3, errors it states."""
    matches = list(_SUMMARY.finditer(stderr))
    if not matches:
        return None
    match = matches[-1]
    out: dict = {"line": match.group(0).strip(), "rows": int(match.group(1)), "seconds": float(match.group(2))}
    counts = stderr[match.end(2):match.end(0)].split(" -> ", 1)[0]  # not the output path
    for number, what in _COUNT.findall(counts):
        word = what.lower()
        key = "model" if "model" in word else "errors" if word.startswith("error") else word[-2:]
        out[key] = out.get(key, 0) + int(number)
    return out


def read_labels(path: Path) -> dict[str, str]:
    """id -> label of an output CSV; "" where the row has no score (no label, or a value in an error column)."""
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        return {row.get("id", str(i)): "" if (row.get("error") or "").strip() else (row.get("label") or "").strip()
                for i, row in enumerate(csv.DictReader(fh))}


def label_agreement(a: dict[str, str], b: dict[str, str]) -> dict:
    """How many rows both outputs hold, and on what share of them the labels
    agree (case aside: the pipeline and the gateway name labels from the same config)."""
    common = [k for k in a if k in b]
    same = sum(1 for k in common if a[k] and a[k].lower() == b[k].lower())
    return {"rows_a": len(a), "rows_b": len(b), "common": len(common), "agree": same,
            "share": round(same / len(common), 4) if common else None}


# --- the parts ------------------------------------------------------------------------------------------------------

def _script(ctx: BenchContext, model: str, source: Path, key: str, *, as_written: bool) -> dict:
    output = ctx.workdir / "classify" / f"{key}.csv"
    argv = [sys.executable, "-m", "inference.pipeline_csv_baseline", "--model", model, "--input", str(source),
            "--column", COLUMN, "--output", str(output), "--batch-size", str(SCRIPT_BATCH)]
    if as_written:
        argv.append("--as-written")
    ctx.log(f"  pipeline script {'as written (no batch_size)' if as_written else f'batch_size={SCRIPT_BATCH}'}")
    run = run_child(argv, output, ctx.out / f"classify-{key}.log")
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines or run.output_s is None:
        raise RuntimeError(f"the pipeline script failed (status {run.returncode}): {run.stderr[-1500:]}")
    own = json.loads(lines[-1])
    return {"seconds": round(run.output_s, 3), "exit_seconds": round(run.exit_s, 3),
            "peak_tree_rss_mb": round(run.peak_tree_mb, 1), "vmhwm_mb": own.get("peak_rss_mb"),
            "rows": own.get("rows"), "scoring_seconds": own.get("seconds"), "load_seconds": own.get("load_seconds"),
            "as_written": as_written, "batch_size": SCRIPT_BATCH, "output": str(output), "argv": argv}


def _classify(ctx: BenchContext, key: str, source: Path, flags: list[str], env: dict[str, str] | None = None) -> dict:
    output = ctx.workdir / "classify" / f"{key}.csv"
    argv = [sys.executable, "-m", "gateway", "classify", str(source), "--column", COLUMN, "-o", str(output),
            "--no-progress", *flags]
    ctx.log(f"  tiergate classify ({key}) {' '.join(flags)}")
    run = run_child(argv, output, ctx.out / f"classify-{key}.log", env=env)
    summary = parse_summary(run.stderr)
    if run.returncode not in (0, 3) or not output.is_file():
        raise RuntimeError(f"tiergate classify ({key}) stopped (status {run.returncode}): {run.stderr[-1500:]}")
    labels = read_labels(output)
    rows = (summary or {}).get("rows") or len(labels)
    return {"seconds": round(run.exit_s, 3), "rows_per_s": round(rows / run.exit_s, 2),
            "rows_per_s_in_command": round(rows / summary["seconds"], 2) if summary and summary["seconds"] else None,
            "peak_tree_rss_mb": round(run.peak_tree_mb, 1),
            "returncode": run.returncode, "summary": summary, "rows_out": len(labels),
            "rows_without_label": sum(1 for v in labels.values() if not v), "output": str(output), "argv": argv}


def _security_flags(security) -> tuple[list[str], dict[str, str] | None]:
    """`tiergate classify --target` flags for bench's own TLS files; its token in the environment, not argv."""
    if security is None:
        return [], None
    flags = []
    if security.tls is not None:
        tls = security.tls
        flags += (["--tls-ca", tls.ca] if tls.ca else []) + \
            (["--tls-client-cert", tls.cert, "--tls-client-key", tls.key] if tls.cert else [])
    env = {**os.environ, "TIERGATE_AUTH_TOKEN": security.token} if security.token else None
    return flags, env


def _same_rows_capacity(ctx: BenchContext, texts: list[str]) -> float:
    """Texts/s of closed-loop single Classify misses of these texts (new to every tier)."""
    cfg = ctx.config
    ctx.files["classify-miss"] = write_lines(ctx.workdir / "classify" / "miss-texts.txt", texts)
    spec = ctx.spec(CLASSIFY, "classify-miss", unique=True, concurrency=cfg.miss_concurrency,
                    connections=min(cfg.connections, cfg.miss_concurrency), rps=None)
    ctx.log(f"  miss capacity on texts like the rows: Classify c={cfg.miss_concurrency} {cfg.duration_s:g}s")
    result = ctx.run_load(ctx.tiergate, spec)
    if not result.texts_per_s:
        raise RuntimeError(f"the miss probe served nothing (errors: {result.errors})")
    return result.texts_per_s


def _attempt(res: ScenarioResult, key: str, part: Callable[..., dict], *args, **kw) -> dict | None:
    """part(*args, **kw): one part's figures, or None with a note: the others still run."""
    try:
        return part(*args, **kw)
    except Exception as exc:
        res.extras[key] = {"error": str(exc)[:2000]}
        res.notes.append(f"{key} failed: {str(exc).splitlines()[0][:200]}")
        return None


@scenario("classify", "tiergate classify on a CSV (cold, warm, --target) vs the pipeline script (as written, "
          f"and with batch_size={SCRIPT_BATCH})", baseline=True)
def classify(ctx: BenchContext, name: str, about: str) -> ScenarioResult:
    cfg = ctx.config
    model = model_dir(cfg.model)
    work = ctx.workdir / "classify"
    texts, source_name = _source_texts(cfg.seed)
    rows = review_rows(texts, cfg.classify_rows, seed=cfg.seed + 10, tag=f"{ctx.run_tag}c")
    source = write_rows(work / "rows.csv", rows)
    target_source = write_rows(work / "target-rows.csv",
                               review_rows(texts, cfg.classify_rows, seed=cfg.seed + 11, tag=f"{ctx.run_tag}t"))
    words = [len(r[COLUMN].split()) for r in rows]
    res = ScenarioResult(name=name, target="tiergate",
                         about=f"{len(rows)} CSV rows of {min(words)}-{max(words)} words: {about}")
    ex = res.extras
    ex.update(rows=len(rows), words_mean=round(sum(words) / len(words), 1), text_source=source_name,
              rss_sample_s=SAMPLE_S, model=model)
    ctx.log(f"  {len(rows)} rows, {ex['words_mean']} words on average")

    for key, as_written in (("script_as_written", True), ("script_fair", False)):
        figures = _attempt(res, key, _script, ctx, model, source, key, as_written=as_written)
        if figures is not None:
            ex[key] = figures

    l2 = work / "l2"
    l2.mkdir(mode=0o700, parents=True)  # private, as classify wants an L2 directory
    embedded = ["--lmdb-path", str(l2)] + (["--model", cfg.model] if cfg.model else [])
    for key in ("cold", "warm"):
        figures = _attempt(res, key, _classify, ctx, key, source, embedded)
        if figures is not None:
            ex[key] = figures

    # The job's rows/s against what the gateway does with the same texts as
    # single Classify misses: the miss scenario's own texts are shorter (its
    # --miss-words), and a text's cost grows with its tokens.
    try:
        probe_rows = review_rows(texts, cfg.classify_rows, seed=cfg.seed + 12, tag=f"{ctx.run_tag}p")
        ex["miss_capacity_texts_per_s"] = round(_same_rows_capacity(ctx, [r[COLUMN] for r in probe_rows]), 2)
        ex["miss_capacity_from"] = (f"Classify misses of other rows like these, closed loop c={cfg.miss_concurrency} "
                                    f"for {cfg.duration_s:g}s")
        if ctx.miss_capacity:
            ex["miss_scenario_texts_per_s"] = round(ctx.miss_capacity, 2)  # shorter texts; for reference
    except Exception as exc:
        res.notes.append(f"no miss capacity to compare --target with: {exc}")
    address, security = ctx.tiergate.address, ctx.tiergate.security
    before = read_settled_stats(address, security=security)
    flags, env = _security_flags(security)
    figures = _attempt(res, "target", _classify, ctx, "target", target_source, ["--target", address, *flags], env)
    if figures is not None:
        figures["gateway_counters"] = counter_diff(before, read_settled_stats(address, security=security))
        ex["target"] = figures

    ex["figures"] = classify_figures(ex)
    if not any(k in ex and "error" not in ex[k] for k in ("cold", "warm", "target")):
        raise RuntimeError("; ".join(res.notes) or "no tiergate classify run succeeded")
    res.rss_peak_mb = ex["figures"].get("tiergate_peak_rss_mb")
    _output_notes(res)
    return res


# --- the figures ----------------------------------------------------------------------------------------------------

def _ok(ex: dict, key: str) -> dict | None:
    part = ex.get(key)
    return part if part and "error" not in part else None


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def classify_figures(ex: dict) -> dict:
    """The ratios and checks the targets read, from the parts' figures (a
    missing part leaves its figures out); the outputs compared by row id."""
    fair, written, cold, warm, target = (_ok(ex, k) for k in ("script_fair", "script_as_written", "cold", "warm",
                                                                "target"))
    sec = {k: p["seconds"] if p else None for k, p in (("fair", fair), ("written", written), ("cold", cold),
                                                         ("warm", warm), ("target", target))}
    out: dict = {
        "cold_vs_fair_script": _div(sec["cold"], sec["fair"]),
        "warm_vs_fair_script": _div(sec["warm"], sec["fair"]),
        "cold_vs_script_as_written": _div(sec["cold"], sec["written"]),
        "fair_script_vs_as_written": _div(sec["fair"], sec["written"]),
    }
    if target:
        out["target_rows_vs_miss_texts"] = _div(target["rows_per_s"], ex.get("miss_capacity_texts_per_s"))
    peaks = [p["peak_tree_rss_mb"] for p in (cold, warm) if p]
    if peaks:
        out["tiergate_peak_rss_mb"] = max(peaks)
    if peaks and fair:
        out["rss_peak_minus_fair_script_mb"] = round(max(peaks) - fair["peak_tree_rss_mb"], 1)
    for key, part in (("cold", cold), ("warm", warm), ("target", target)):
        if part:
            stated = (part.get("summary") or {}).get("errors")
            # The summary's own count where it gives one; else the rows left without a label.
            out[f"{key}_errors"] = stated if stated is not None else part["rows_without_label"]
    if fair and cold:
        out["labels_cold_vs_fair_script"] = label_agreement(read_labels(Path(fair["output"])),
                                                            read_labels(Path(cold["output"])))
    if cold and warm:
        out["labels_warm_vs_cold"] = label_agreement(read_labels(Path(cold["output"])),
                                                     read_labels(Path(warm["output"])))
    return {k: v for k, v in out.items() if v is not None}


def _output_notes(res: ScenarioResult) -> None:
    ex, fig = res.extras, res.extras["figures"]
    for key in ("cold", "warm", "target"):
        part = _ok(ex, key)
        if part is None:
            continue
        if part.get("summary") is None:
            res.notes.append(f"{key}: no summary line on stderr (see classify-{key}.log)")
        elif "errors" not in part["summary"]:
            res.notes.append(f"{key}: the summary line gives no error count; counted rows without a label")
        if fig.get(f"{key}_errors"):
            res.notes.append(f"{key}: {fig[f'{key}_errors']} rows with an error (exit status {part['returncode']})")
    cold = _ok(ex, "cold")
    if cold and (cold.get("summary") or {}).get("l1"):
        # Every row is distinct and the stack starts empty: an L1 answer is a row of a call the
        # gateway refused in part (its other texts were scored and cached), sent again.
        res.notes.append(f"cold: {cold['summary']['l1']} rows came from L1 of a fresh stack: retried calls whose "
                         "other texts the model had refused")
    target = _ok(ex, "target")
    counters = (target or {}).get("gateway_counters") or {}
    refused, scored = counters.get("errors_resource_exhausted", 0), counters.get("model_texts", 0)
    if refused or scored > ex["rows"]:
        res.notes.append(f"--target: the gateway refused {refused} calls (RESOURCE_EXHAUSTED) and sent the model "
                         f"{scored} texts for {ex['rows']} rows ({counters.get('model_errors', 0)} of them refused by "
                         "its queue, so sent again)")
    warm = _ok(ex, "warm")
    if warm and warm.get("summary") and warm["summary"].get("l2", 0) < ex["rows"]:
        res.notes.append(f"warm: {warm['summary'].get('l2', 0)} of {ex['rows']} rows came from L2")
    agree = fig.get("labels_cold_vs_fair_script")
    if agree and agree["common"] != agree["rows_a"]:
        res.notes.append(f"the outputs differ in rows: script {agree['rows_a']}, tiergate {agree['rows_b']}")
