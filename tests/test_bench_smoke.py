"""`tiergate bench`'s plumbing on fake numbers: parsing the load generators'
output, the table, the targets section, bench.json, settings validation, the
trivial baseline server, the Python generator's per-code error latencies and
hung count, the bare forward mode, and the classify scenario's parts (its
CSV, the summary line, figures, targets and lines on fake outputs, the child
timing, the pipeline CSV script on a tiny model). No benchmark runs here:
numbers are never part of pass/fail."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time
from concurrent import futures
from dataclasses import asdict

import grpc
import pytest

from gateway.bench.catalog import check_scenarios
from gateway.bench.config import BenchConfig, parse_duration, parse_rates
from gateway.bench.goals import check_targets, render_targets
from gateway.bench.loadgen import Ghz, Grpcload, LoadResult, LoadSpec, PythonLoad, ghz_messages, status_name
from gateway.bench.procs import OthersCpu, RssSnapshot, tree_rss
from gateway.bench.pyload import percentiles
from gateway.bench.report import draw_latency_png, miss_lines, ratios, render_table, write_json
from gateway.bench.scenarios import ScenarioResult
from gateway.bench.texts import unique_texts, zipf_samples
from protos import classifier_pb2
from tests.support.processes import READY


def _load(calls: float, batch: int = 1, **kw) -> LoadResult:
    base = dict(generator="grpcload", ok=int(calls * 10), errors={}, seconds=10.0, calls_per_s=calls,
                texts_per_s=calls * batch, p50_ms=1.0, p90_ms=2.0, p95_ms=3.0, p99_ms=4.0, max_ms=9.0,
                offered_rps=None)
    return LoadResult(**{**base, **kw})


def _fake_results() -> list[ScenarioResult]:
    rss = RssSnapshot(total_mb=600.0, processes=())
    return [
        ScenarioResult("hit-unary", "tiergate", "", load=_load(3000), rss=rss,
                       counters={"hits_l1": 29000, "hits_l2": 1000, "model_texts": 0}),
        ScenarioResult("hit-batch", "tiergate", "", load=_load(200, batch=100), rss=rss),
        ScenarioResult("miss", "tiergate", "", load=_load(60, errors={"UNAVAILABLE": 2}), rss=rss,
                       counters={"model_texts": 600}),
        ScenarioResult("zipf", "tiergate", "", error="grpcload failed (status 2)\nmore detail"),
        ScenarioResult("gostub", "gostub", "", load=_load(30000), rss=RssSnapshot(15.0, ())),
        ScenarioResult("trivial-aio", "trivial-aio", "", load=_load(4000), rss=RssSnapshot(40.0, ())),
        ScenarioResult("pipeline", "pipeline", "", pipeline={"texts_per_s": 20.0, "rss_mb": 400.0}),
    ]


def test_ratios_and_table_from_fake_results(tmp_path):
    results = _fake_results()
    rat = ratios(results)
    assert rat["hit_unary_calls_vs_gostub_calls"] == pytest.approx(0.1)
    assert rat["hit_unary_calls_vs_trivial_aio_calls"] == pytest.approx(0.75)
    assert rat["hit_batch_texts_vs_gostub_calls"] == pytest.approx(20000 / 30000, abs=1e-4)
    assert rat["miss_texts_vs_pipeline_texts"] == pytest.approx(3.0)
    assert rat["tiergate_rss_vs_pipeline_rss"] == pytest.approx(1.5)

    table = render_table(results, header=["head"], footer=["foot"])
    lines = table.splitlines()
    assert lines[0] == "head" and lines[-1] == "foot"
    row = {line.split()[0]: line for line in lines[3:-1]}
    assert "L1 96.7% L2 3.33%" in row["hit-unary"] and "0.10x gostub, 0.75x aio" in row["hit-unary"]
    assert "UNAVAILABLE=2" in row["miss"] and "3.00x pipeline" in row["miss"]
    assert "failed: grpcload failed (status 2)" in row["zipf"] and "more detail" not in table
    assert "n/a" in row["gostub"]  # no tier counters from a baseline

    doc = json.loads(write_json(tmp_path / "bench.json", {"command": ["x"]}, results).read_text())
    assert doc["ratios"] == rat
    assert doc["scenarios"][0]["tier_hits"]["L2"] == 1000
    assert doc["scenarios"][3]["error"].startswith("grpcload failed")


def test_grpcload_and_ghz_output_parse_to_the_same_fields(tmp_path):
    spec = LoadSpec(method="/tiergate.v1.Classifier/Classify", texts_file=tmp_path / "t.txt", batch=2)
    line = json.dumps({"ok": 100, "error_count": 3, "errors": {"DeadlineExceeded": 3}, "seconds": 2.0, "rps": 50.0,
                       "texts_per_s": 100.0, "p50_ms": 1.5, "p90_ms": 2, "p95_ms": 3, "p99_ms": 4, "max_ms": 5})
    g = Grpcload("grpcload").parse("noise\n" + line + "\n", spec)
    assert (g.calls_per_s, g.texts_per_s, g.p99_ms, g.errors) == (50.0, 100.0, 4.0, {"DEADLINE_EXCEEDED": 3})

    ghz = {"count": 103, "total": 2_000_000_000, "rps": 51.5, "slowest": 5_000_000,
           "statusCodeDistribution": {"OK": 100, "Unavailable": 3},
           "latencyDistribution": [{"percentage": p, "latency": p * 100_000} for p in (10, 25, 50, 75, 90, 95, 99)]}
    h = Ghz("ghz").parse(json.dumps(ghz), spec)
    assert (h.ok, h.calls_per_s, h.texts_per_s, h.errors) == (100, 50.0, 100.0, {"UNAVAILABLE": 3})
    assert (h.p50_ms, h.p99_ms, h.max_ms) == (5.0, 9.9, 5.0)


def test_ghz_data_matches_grpcload_numbering(tmp_path):
    (tmp_path / "t.txt").write_text("a b\nc\n")
    spec = LoadSpec(method="/x/Y", texts_file=tmp_path / "t.txt", unique=True)
    assert ghz_messages(spec) == [{"text": "a b #{{.RequestNumber}}"}, {"text": "c #{{.RequestNumber}}"}]
    assert unique_texts(["a b", "c"], 3) == ["a b #0", "c #1", "a b #2"]  # grpcload -unique, request j
    batch = ghz_messages(LoadSpec(method="/x/Y", texts_file=tmp_path / "t.txt", batch=2))
    assert batch == [{"texts": ["a b", "c"]}]


@pytest.mark.parametrize("code, name", [("DeadlineExceeded", "DEADLINE_EXCEEDED"), ("OK", "OK"),
                                        ("StatusCode.UNAVAILABLE", "UNAVAILABLE"), ("Unknown", "UNKNOWN")])
def test_status_names(code, name):
    assert status_name(code) == name


def test_settings_are_validated_with_the_bad_value():
    assert parse_duration("1.5s") == 1.5 and parse_duration("250ms") == 0.25 and parse_duration("2m") == 120
    assert parse_rates("250, 500") == (250.0, 500.0) and parse_rates("none") == ()
    with pytest.raises(ValueError, match="'10 parsecs'"):
        parse_duration("10 parsecs")
    with pytest.raises(ValueError, match="'hit-everything'"):
        check_scenarios(("hit-unary", "hit-everything"))
    with pytest.raises(ValueError, match="got 0"):
        BenchConfig(scenarios=("miss",), concurrency=0)
    with pytest.raises(ValueError, match="'localhost'"):
        BenchConfig(scenarios=("miss",), target="localhost")
    with pytest.raises(ValueError, match="--pid 123"):
        BenchConfig(scenarios=("miss",), pid=123)


def test_zipf_samples_favour_the_first_ranks():
    samples = zipf_samples([f"t{i}" for i in range(1000)], 1.1, 20000, seed=1)
    assert samples.count("t0") > samples.count("t1") > samples.count("t9") > samples.count("t999")


def test_rss_of_this_process_tree_is_positive():
    snap = tree_rss(__import__("os").getpid())
    assert snap.total_mb > 0 and snap.processes[0].rss_mb > 0
    assert OthersCpu(__import__("os").getpid()).cores() >= 0


def test_latency_png_or_a_clear_message(tmp_path):
    sweep = {"points": [{"offered_rps": r, "achieved_rps": r, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0,
                         "behind": r == 2000} for r in (500, 1000, 2000)]}
    msg = draw_latency_png(tmp_path / "lat.png", sweep, "title")
    assert msg == f"wrote {tmp_path / 'lat.png'}" or msg.startswith("matplotlib is not installed")
    assert draw_latency_png(tmp_path / "none.png", {}, "t") == "no latency sweep ran: no PNG"


def test_trivial_server_answers_classify_with_fixed_bytes():
    with subprocess.Popen([sys.executable, "-m", "gateway.bench.trivial_server", "--port", "0"],
                          stdout=subprocess.PIPE, text=True, cwd=pathlib.Path(__file__).parents[1]) as proc:
        try:
            address = READY.search(proc.stdout.readline()).group(1)
            with grpc.insecure_channel(address) as channel:
                call = channel.unary_unary("/tiergate.v1.Classifier/Classify",
                                           request_serializer=classifier_pb2.ClassifyRequest.SerializeToString,
                                           response_deserializer=classifier_pb2.ClassifyResponse.FromString)
                reply = call(classifier_pb2.ClassifyRequest(text="anything"), timeout=10)
            assert (reply.label, reply.tier) == ("positive", classifier_pb2.TIER_L1)
        finally:
            proc.terminate()
        assert proc.wait(10) == 0


# --- the miss path: miss-idle, miss-80, overload and the targets section -------------------------------------------

def _miss_results(*, refused_max: float = 20.0, hung: int = 0, recovery_errors: dict | None = None,
                  overload_rss_peak: float = 780.0) -> list[ScenarioResult]:
    rss = RssSnapshot(total_mb=600.0, processes=())
    idle = ScenarioResult("miss-idle", "tiergate", "", load=_load(50, p50_ms=12.0), rss=rss,
                          extras={"bare_forward": {"p50_ms": 10.0, "p90_ms": 11.0, "min_ms": 9.0, "texts": 50,
                                                   "dtype": "int8-dynamic", "device": "cpu", "torch_threads": 2}})
    m80 = ScenarioResult("miss-80", "tiergate", "", load=_load(240, p50_ms=50.0, p99_ms=150.0), rss=rss,
                         extras={"offered_rps": 240.0, "capacity_texts_per_s": 300.0,
                                 "capacity_from": "the miss scenario"})
    errors = {"RESOURCE_EXHAUSTED": 2500, **({"DEADLINE_EXCEEDED": hung} if hung else {})}
    over_load = _load(300, errors=errors, generator="python",
                      error_latency_ms={"RESOURCE_EXHAUSTED": {"p50": 2.0, "p99": 9.0, "max": refused_max}},
                      hung=hung, sent=18000, sent_per_s=600.0, send_lag_ms={"p50": 0.5, "p99": 4.0, "max": 9.0})
    recovery = asdict(_load(30, p50_ms=14.0, errors=recovery_errors or {}))
    over = ScenarioResult("overload", "tiergate", "", load=over_load, rss=rss, rss_peak_mb=overload_rss_peak,
                          extras={"offered_rps": 600.0, "capacity_texts_per_s": 300.0, "call_timeout_s": 20.0,
                                  "refused": 2500, "other_errors": {}, "hung": hung, "recovery": recovery,
                                  "refused_latency_ms": over_load.error_latency_ms["RESOURCE_EXHAUSTED"]})
    miss = ScenarioResult("miss", "tiergate", "", load=_load(300), rss=rss, rss_peak_mb=620.0,
                          extras={"model_alone": {"texts_per_s": 330.0, "runtime": "onnxruntime", "lanes": 2,
                                                  "threads": 1, "texts_per_pass": 4, "dtype": "float32",
                                                  "device": "cpu"}})
    pipe = ScenarioResult("pipeline", "pipeline", "", pipeline={"texts_per_s": 90.0, "rss_mb": 640.0})
    return [miss, idle, m80, over, pipe]


def test_targets_pass_fail_and_not_measured():
    checks = {c.key: c for c in check_targets(_miss_results(), "float32", vnni=False)}
    assert {k: c.verdict for k, c in checks.items()} == {
        "miss_vs_pipeline": "PASS", "miss_vs_model_alone": "PASS", "idle_vs_bare_forward": "PASS",
        "miss_80_tail": "PASS", "overload_refusals": "PASS", "overload_errors": "PASS", "overload_hung": "PASS",
        "overload_recovery": "PASS", "rss_miss": "PASS", "rss_miss_peak": "PASS", "rss_overload_peak": "PASS"}
    assert checks["miss_vs_pipeline"].value.startswith("3.33x") and "AVX2" in checks["miss_vs_pipeline"].target
    assert checks["miss_vs_model_alone"].value.startswith("91%")
    assert checks["rss_overload_peak"].value.startswith("+140 MB")
    assert checks["rss_miss"].value.startswith("-40 MB") and checks["rss_miss"].target == "<= pipeline"

    bad = {c.key: c for c in check_targets(_miss_results(refused_max=80.0, hung=3, recovery_errors={"UNAVAILABLE": 1},
                                                         overload_rss_peak=800.0), "float32", vnni=True)}
    assert bad["miss_vs_pipeline"].verdict == "FAIL" and "4x" in bad["miss_vs_pipeline"].target
    for key in ("overload_refusals", "overload_hung", "overload_recovery", "rss_overload_peak"):
        assert bad[key].verdict == "FAIL", key
    assert bad["overload_errors"].verdict == "PASS"  # DEADLINE_EXCEEDED is "hung", not another error

    only_miss = {c.key: c for c in check_targets(_miss_results()[:1], None)}
    assert only_miss["miss_vs_pipeline"].verdict == "n/a" and "--compare" in only_miss["miss_vs_pipeline"].value
    assert only_miss["overload_hung"].verdict == "n/a"

    lines = render_targets(check_targets(_miss_results(), "int8-dynamic", vnni=False))
    assert lines[0].startswith("targets") and lines[-1].strip() == "11 PASS"
    assert any(line.strip().startswith("PASS  miss-80 p99 / p50") and "3.00x" in line for line in lines)


def test_miss_rows_ratios_and_json(tmp_path):
    results = _miss_results()
    rat = ratios(results)
    assert rat["miss_idle_p50_vs_bare_forward_p50"] == pytest.approx(1.2)
    assert rat["miss_80_p99_vs_p50"] == pytest.approx(3.0)
    table = render_table(results, header=[], footer=miss_lines(results))
    row = {line.split()[0]: line for line in table.splitlines()[2:2 + len(results)]}
    assert "1.20x bare forward p50" in row["miss-idle"] and "p99/p50 3.00x" in row["miss-80"]
    assert "refused p99 9.00 ms, hung 0" in row["overload"] and "RESOURCE_EXHAUSTED=2500" in row["overload"]
    assert "sent 600/s" in table and "recovery after overload" in table and "bare forward" in table

    checks = check_targets(results, "int8-dynamic", vnni=False)
    doc = json.loads(write_json(tmp_path / "bench.json", {}, results, checks).read_text())
    over = next(s for s in doc["scenarios"] if s["name"] == "overload")
    assert over["load"]["error_latency_ms"]["RESOURCE_EXHAUSTED"]["max"] == 20.0 and over["load"]["hung"] == 0
    assert over["extras"]["recovery"]["ok"] == 300
    assert [t["verdict"] for t in doc["targets"]].count("PASS") == 11


def test_pyload_output_carries_error_latencies_and_hung(tmp_path):
    spec = LoadSpec(method="/x/Y", texts_file=tmp_path / "t.txt", rps=100, timeout_s=1.5)
    assert Grpcload("grpcload").argv(spec, "h:1", tmp_path)[-4:] == ["-rps", "100", "-timeout", "1500ms"]
    line = json.dumps({"ok": 10, "errors": {"RESOURCE_EXHAUSTED": 4}, "seconds": 1.0, "rps": 10.0,
                       "texts_per_s": 10.0, "p50_ms": 1, "p90_ms": 2, "p95_ms": 3, "p99_ms": 4, "max_ms": 5,
                       "error_latency_ms": {"RESOURCE_EXHAUSTED": {"p50": 1.0, "p99": 2.0, "max": 3.0}},
                       "hung": 0, "sent": 14, "sent_per_s": 14.0, "send_lag_ms": {"p50": 0.1, "p99": 0.2, "max": 0.3}})
    res = PythonLoad(sys.executable).parse(line, spec)
    assert res.error_latency_ms == {"RESOURCE_EXHAUSTED": {"p50": 1.0, "p99": 2.0, "max": 3.0}}
    assert (res.hung, res.sent, res.sent_per_s) == (0, 14, 14.0)
    assert percentiles([0.001, 0.002, 0.010]) == {"p50": 2.0, "p99": 2.0, "max": 10.0}


class _Refuser(grpc.GenericRpcHandler):
    """Answers "ok" texts, refuses "full" ones with RESOURCE_EXHAUSTED, never answers "hang" ones in time."""

    def service(self, details):
        def handle(request: bytes, context):
            if b"full" in request:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
            if b"hang" in request:
                time.sleep(3)
            return b""

        return grpc.unary_unary_rpc_method_handler(handle)


def test_pyload_times_refusals_per_code_and_counts_hung_calls(tmp_path):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), handlers=[_Refuser()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        texts = tmp_path / "texts.txt"
        texts.write_text("ok\nfull\nok\nhang\n")
        proc = subprocess.run([sys.executable, "-m", "gateway.bench.pyload", "-addr", f"127.0.0.1:{port}",
                               "-call", "/x.Y/Z", "-texts", str(texts), "-c", "4", "-n", "8", "-timeout", "500ms"],
                              capture_output=True, text=True, timeout=60, cwd=pathlib.Path(__file__).parents[1])
    finally:
        server.stop(0)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ok"] == 4 and out["errors"] == {"RESOURCE_EXHAUSTED": 2, "DEADLINE_EXCEEDED": 2}
    assert out["hung"] == 2 and out["sent"] == 8 and out["unfinished"] == 0
    assert set(out["error_latency_ms"]) == {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
    assert out["error_latency_ms"]["RESOURCE_EXHAUSTED"]["max"] < 400
    assert out["error_latency_ms"]["DEADLINE_EXCEEDED"]["p50"] >= 450


def test_bare_forward_prints_one_pass_percentiles(tiny_model, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"a new text number {i} #{i}\n" for i in range(6)))
    proc = subprocess.run([sys.executable, "-m", "inference.pipeline_baseline", "--model", str(tiny_model),
                           "--texts", str(texts), "--bare-forward", "4", "--warmup", "2", "--quantize", "on",
                           "--runtime", "torch"],
                          capture_output=True, text=True, timeout=300, cwd=pathlib.Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mode"] == "bare-forward" and out["texts"] == 4 and out["dtype"] == "int8-dynamic"
    assert 0 < out["min_ms"] <= out["p50_ms"] <= out["p90_ms"] <= out["max_ms"]


def test_model_alone_keeps_every_lane_busy(tiny_model, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"a new text number {i} #{i}\n" for i in range(40)))
    proc = subprocess.run([sys.executable, "-m", "inference.pipeline_baseline", "--model", str(tiny_model),
                           "--texts", str(texts), "--model-alone", "1", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, cwd=pathlib.Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mode"] == "model-alone" and out["lanes"] >= 1 and out["texts_per_pass"] >= 1
    # Every lane ran for the whole second (a lane that stopped at once would leave a share unscored).
    assert out["texts"] >= out["lanes"] * out["texts_per_pass"] and 0.9 <= out["seconds"] < 5
    assert out["texts_per_s"] == pytest.approx(out["texts"] / out["seconds"], rel=1e-3)


def test_miss_settings_are_validated():
    with pytest.raises(ValueError, match="--miss-concurrency must be >= 1, got 0"):
        BenchConfig(scenarios=("miss",), miss_concurrency=0)
    with pytest.raises(ValueError, match="--overload-duration"):
        BenchConfig(scenarios=("overload",), overload_duration_s=0)
    assert BenchConfig(scenarios=("miss-idle", "miss-80", "overload")).miss_concurrency == 32


# --- the classify scenario: its CSV, the summary line, the figures, targets and lines ---------------------------------

def test_classify_rows_are_seeded_new_and_40_to_60_words():
    from gateway.bench.classify_scenario import COLUMN, MAX_WORDS, MIN_WORDS, review_rows

    texts = [f"text {i} is a short tweet about something" for i in range(30)]
    rows = review_rows(texts, 50, seed=3, tag="abc")
    assert rows == review_rows(texts, 50, seed=3, tag="abc")
    assert [r["id"] for r in rows] == [str(i) for i in range(1, 51)] and set(rows[0]) == {"id", COLUMN, "points"}
    assert all(MIN_WORDS <= len(r[COLUMN].split()) <= MAX_WORDS for r in rows)
    assert len({r[COLUMN] for r in rows}) == 50 and rows[7][COLUMN].endswith(" ~abc-7")  # the pool wraps; tags differ
    other = review_rows(texts, 50, seed=3, tag="xyz")
    assert not {r[COLUMN] for r in rows} & {r[COLUMN] for r in other}


def test_classify_summary_line_parses_in_both_wordings():
    from gateway.bench.classify_scenario import parse_summary

    line = ("log noise\nclassified 1000 rows in 3.2 s: 950 scored by the model, 50 from L1, 0 from L2, 0 from L3, "
            "0 errors -> /tmp/3 L2/out.csv; the model was not needed\n")
    out = parse_summary(line)
    assert (out["rows"], out["seconds"], out["model"], out["l1"], out["l2"], out["l3"], out["errors"]) == \
        (1000, 3.2, 950, 50, 0, 0, 0)
    old = parse_summary("classified 20 rows in 1.0 s (15 MODEL, 5 L2) -> out.csv")
    assert (old["model"], old["l2"], "errors" in old) == (15, 5, False)
    assert parse_summary("Traceback (most recent call last):") is None


def _write_scored(path: pathlib.Path, labels: list[str], errors: dict[int, str] | None = None) -> str:
    errors = errors or {}
    lines = ["id,description,points,label,score,error"] + [
        f"{i + 1},text {i},3,{'' if i in errors else label},0.9,{errors.get(i, '')}" for i, label in enumerate(labels)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _classify_result(tmp_path: pathlib.Path, *, cold_s: float = 4.0, target_rps: float = 95.0,
                     cold_rss: float = 600.0, errors: dict[int, str] | None = None) -> ScenarioResult:
    from gateway.bench.classify_scenario import classify_figures

    labels = ["positive", "negative"] * 10
    flipped = labels[:-1] + ["positive"]  # one close call of 20 goes the other way
    summary = {"line": "classified 20 rows ...", "rows": 20, "seconds": 3.5, "model": 20, "l1": 0, "l2": 0,
               "l3": 0, "errors": len(errors or {})}
    ex = {"rows": 20, "words_mean": 50.0, "rss_sample_s": 0.05, "miss_capacity_texts_per_s": 100.0,
          "miss_capacity_from": "the miss scenario",
          "script_as_written": {"seconds": 20.0, "peak_tree_rss_mb": 480.0, "vmhwm_mb": 470.0, "load_seconds": 1.0,
                                "output": _write_scored(tmp_path / "written.csv", labels)},
          "script_fair": {"seconds": 10.0, "peak_tree_rss_mb": 520.0, "vmhwm_mb": 515.0, "load_seconds": 1.0,
                          "output": _write_scored(tmp_path / "fair.csv", labels)},
          "cold": {"seconds": cold_s, "rows_per_s": 20 / cold_s, "peak_tree_rss_mb": cold_rss, "returncode": 0,
                   "summary": summary, "rows_out": 20, "rows_without_label": len(errors or {}),
                   "output": _write_scored(tmp_path / "cold.csv", flipped, errors)},
          "warm": {"seconds": 0.5, "rows_per_s": 40.0, "peak_tree_rss_mb": 60.0, "returncode": 0,
                   "summary": {**summary, "model": 0, "l2": 20, "errors": 0}, "rows_out": 20, "rows_without_label": 0,
                   "output": _write_scored(tmp_path / "warm.csv", flipped)},
          "target": {"seconds": 20 / target_rps, "rows_per_s": target_rps, "rows_per_s_in_command": 110.0,
                     "peak_tree_rss_mb": 70.0, "returncode": 0, "summary": {**summary, "errors": 0}, "rows_out": 20,
                     "rows_without_label": 0, "output": _write_scored(tmp_path / "target.csv", labels)}}
    ex["figures"] = classify_figures(ex)
    return ScenarioResult("classify", "tiergate", "", extras=ex, rss_peak_mb=ex["figures"]["tiergate_peak_rss_mb"])


def test_classify_figures_targets_and_lines(tmp_path):
    from gateway.bench.report import classify_lines

    res = _classify_result(tmp_path)
    fig = res.extras["figures"]
    assert (fig["cold_vs_fair_script"], fig["warm_vs_fair_script"], fig["target_rows_vs_miss_texts"]) == \
        (0.4, 0.05, 0.95)
    assert fig["rss_peak_minus_fair_script_mb"] == 80.0 and fig["cold_errors"] == 0
    assert fig["labels_cold_vs_fair_script"] == {"rows_a": 20, "rows_b": 20, "common": 20, "agree": 19, "share": 0.95}
    assert fig["labels_warm_vs_cold"]["share"] == 1.0

    checks = {c.key: c for c in check_targets([res], None) if c.key.startswith("classify")}
    assert {k: c.verdict for k, c in checks.items()} == {
        "classify_cold": "PASS", "classify_warm": "PASS", "classify_target": "PASS", "classify_rss": "PASS",
        "classify_output": "PASS"}
    assert checks["classify_cold"].value == "0.40x (4.00 s vs 10.0 s)"
    assert checks["classify_rss"].value.startswith("+80 MB (600 vs 520 MB)")

    bad = {c.key: c for c in check_targets([_classify_result(tmp_path, cold_s=5.0, target_rps=80.0, cold_rss=700.0,
                                                             errors={3: "INVALID: bad text"})], None)}
    for key in ("classify_cold", "classify_target", "classify_rss", "classify_output"):
        assert bad[key].verdict == "FAIL", key
    assert "1 errors" in bad["classify_output"].value

    assert not any(c.key.startswith("classify") for c in check_targets(_miss_results(), "int8-dynamic", vnni=False))
    failed = ScenarioResult("classify", "-", "", error="no model")
    assert {c.verdict for c in check_targets([failed], None) if c.key.startswith("classify")} == {"n/a"}

    lines = classify_lines([res])
    assert lines[0].startswith("classify: 20 CSV rows")
    row = {line.split("  ")[1].strip(): line for line in lines[2:7]}
    assert "0.40x" in row["tiergate classify, cold (embedded, empty L2)"]
    assert "labels agree 95.0% with the fair script" in row["tiergate classify, cold (embedded, empty L2)"]
    assert "0.95x the miss capacity" in row["tiergate classify --target (bench's gateway)"]
    assert lines[-1].endswith("+80 MB")
    table = render_table([res], header=[], footer=[])
    assert "0.40x cold, 0.05x warm vs fair script, --target 0.95x miss" in table
    assert ratios([res])["classify_cold_vs_fair_script"] == 0.4


def test_run_child_times_the_output_file_and_the_exit(tmp_path):
    from gateway.bench.classify_scenario import run_child

    out = tmp_path / "out.csv"
    code = f"import pathlib, time; pathlib.Path({str(out)!r}).write_text('x'); time.sleep(0.3); print('done')"
    run = run_child([sys.executable, "-c", code], out, tmp_path / "child.log")
    assert run.returncode == 0 and run.stdout.strip() == "done"
    assert run.output_s is not None and run.output_s + 0.25 <= run.exit_s
    assert run.peak_tree_mb > 0


def test_pipeline_csv_baseline_scores_both_ways(tiny_model, tmp_path):
    from gateway.bench.classify_scenario import review_rows, write_rows

    source = write_rows(tmp_path / "in.csv", review_rows(["a new review of the thing"] * 3, 10, seed=1, tag="t"))
    labels = {}
    for flags in (["--as-written"], []):
        output = tmp_path / f"out{len(flags)}.csv"
        proc = subprocess.run([sys.executable, "-m", "inference.pipeline_csv_baseline", "--model", str(tiny_model),
                               "--input", str(source), "--column", "description", "--output", str(output), *flags],
                              capture_output=True, text=True, timeout=300, cwd=pathlib.Path(__file__).parents[1])
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["rows"] == 10 and out["as_written"] == bool(flags) and out["peak_rss_mb"] > 0
        with output.open(newline="") as fh:
            rows = list(__import__("csv").DictReader(fh))
        assert [r["id"] for r in rows] == [str(i) for i in range(1, 11)] and rows[0]["points"]
        labels[bool(flags)] = [r["label"] for r in rows]
        assert set(labels[bool(flags)]) <= {"negative", "positive"} and all(float(r["score"]) > 0 for r in rows)
    assert labels[True] == labels[False]
