"""`tiergate bench`'s plumbing on fake numbers: parsing the load generators'
output, the table, bench.json, settings validation, and the trivial baseline
server. No benchmark runs here: numbers are never part of pass/fail."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import grpc
import pytest

from gateway.bench.config import BenchConfig, parse_duration, parse_rates
from gateway.bench.loadgen import Ghz, Grpcload, LoadResult, LoadSpec, ghz_messages, status_name
from gateway.bench.procs import RssSnapshot, tree_rss
from gateway.bench.report import draw_latency_png, ratios, render_table, write_json
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
        BenchConfig(scenarios=("hit-unary", "hit-everything"))
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
