"""`tiergate bench --load ghz`: real ghz JSON reports (tests/data/ghz_report_*.json,
written by ghz v0.121.0 with `--format json`, `details` trimmed to a few calls)
parse to milliseconds and status counts; the flags we pass are the ones we
check ghz's --help for; a missing or too old ghz is a clear error. When a real
ghz is on PATH or in $TIERGATE_GHZ, it also runs for about a second against a
real gateway (CI has none: skipped, with the reason)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import stat

import pytest

from gateway.bench.config import BenchConfig
from gateway.bench.loadgen import GHZ_FLAGS, Ghz, LoadSpec, Tools, generators
from gateway.bench.runner import run

DATA = pathlib.Path(__file__).parent / "data"
CLASSIFY = "/tiergate.v1.Classifier/Classify"


def _spec(tmp_path: pathlib.Path, **kw) -> LoadSpec:
    texts = tmp_path / "texts.txt"
    if not texts.exists():
        texts.write_text("I love this\nI hate this\nit is fine\n", encoding="utf-8")
    return LoadSpec(method=kw.pop("method", CLASSIFY), texts_file=texts, **kw)


def test_a_real_ghz_report_converts_nanoseconds_to_milliseconds(tmp_path):
    # -c 50 --connections 4 -z 1s with ghz's default --duration-stop close: the
    # 22 calls in flight at the end were cut and counted as Unavailable.
    report = (DATA / "ghz_report_gostub.json").read_text(encoding="utf-8")
    res = Ghz("ghz").parse(report, _spec(tmp_path, batch=2))
    assert res.seconds == pytest.approx(1.014350717)
    assert (res.ok, res.errors, res.error_count) == (2755, {"UNAVAILABLE": 22}, 22)
    assert res.calls_per_s == pytest.approx(2755 / 1.014350717)  # OK calls only; ghz's "rps" counts the 22 too
    assert res.texts_per_s == pytest.approx(2 * res.calls_per_s)
    assert (res.p50_ms, res.p90_ms, res.p95_ms, res.p99_ms, res.max_ms) == pytest.approx(
        (8.417717, 21.192174, 31.325329, 42.200586, 45.680632))


def test_a_real_ghz_report_without_an_ok_call_has_no_latency(tmp_path):
    report = (DATA / "ghz_report_deadline.json").read_text(encoding="utf-8")  # -t 1us: every call too late
    res = Ghz("ghz").parse(report, _spec(tmp_path))
    assert (res.ok, res.errors, res.calls_per_s) == (0, {"DEADLINE_EXCEEDED": 3}, 0.0)
    assert (res.p50_ms, res.p99_ms, res.max_ms) == (None, None, None)
    assert res.seconds == pytest.approx(0.005144619)


def test_status_codes_from_ghz_are_counted_under_grpc_names(tmp_path):
    report = {"count": 7, "total": 1_000_000_000, "slowest": 2_000_000, "latencyDistribution": None,
              "statusCodeDistribution": {"OK": 3, "Canceled": 1, "ResourceExhausted": 2, "": 1}}
    res = Ghz("ghz").parse(json.dumps(report), _spec(tmp_path))
    assert res.errors == {"CANCELLED": 1, "RESOURCE_EXHAUSTED": 2, "UNKNOWN": 1}
    with pytest.raises(RuntimeError, match="no JSON report"):
        Ghz("ghz").parse("Summary:\n  Count: 3\n", _spec(tmp_path))


def test_ghz_argv_waits_for_calls_in_flight_and_uses_only_checked_flags(tmp_path):
    ghz = Ghz("ghz")
    timed = ghz.argv(_spec(tmp_path, concurrency=8, connections=4, duration_s=2.5), "127.0.0.1:1", tmp_path)
    assert timed[timed.index("--duration") + 1] == "2500ms"
    assert timed[timed.index("--duration-stop") + 1] == "wait"
    assert "--disable-template-data" in timed and timed[-1] == "127.0.0.1:1"
    counted = ghz.argv(_spec(tmp_path, concurrency=8, connections=4, duration_s=None, requests=3, unique=True),
                       "127.0.0.1:1", tmp_path)
    assert counted[counted.index("--total") + 1] == "3"
    # ghz refuses -n < -c and --connections > -c
    assert (counted[counted.index("--concurrency") + 1], counted[counted.index("--connections") + 1]) == ("3", "3")
    assert "--disable-template-data" not in counted  # -unique is {{.RequestNumber}}
    for argv in (timed, counted):
        assert {a for a in argv if a.startswith("-")} <= set(GHZ_FLAGS)


def _fake_ghz(tmp_path: pathlib.Path, help_text: str) -> str:
    path = tmp_path / "ghz"
    path.write_text(f"#!/bin/sh\nif [ \"$1\" = --version ]; then echo v0.20.0 >&2; exit 0; fi\n"
                    f"cat >&2 <<'EOF'\n{help_text}\nEOF\n", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_an_old_ghz_is_refused_with_what_it_lacks(tmp_path, capsys):
    old = _fake_ghz(tmp_path, "\n".join(f"  {f}=X" for f in GHZ_FLAGS if f != "--duration-stop"))
    with pytest.raises(ValueError, match=r"\(v0\.20\.0\): its --help lists no --duration-stop;.*ghz/build\.sh"):
        generators(Tools(ghz=old, grpcload=None, gostub=None), "ghz")
    gens = generators(Tools(ghz=old, grpcload=None, gostub=None), "auto")  # auto: skipped, with a warning
    assert [g.name for g in gens] == ["python"]
    assert "warning: not using ghz" in capsys.readouterr().err
    good = _fake_ghz(tmp_path, "\n".join(f"  {f}=X" for f in GHZ_FLAGS))
    assert Ghz(good).check() == "v0.20.0"


def test_bench_says_what_is_missing_before_starting_anything(tmp_path, capsys):
    cfg = BenchConfig(scenarios=("hit-unary",), load="ghz", ghz=str(tmp_path / "nope"), out=tmp_path / "out")
    assert run(cfg) == 2
    assert "--ghz" in capsys.readouterr().err and not (tmp_path / "out" / "bench.json").exists()


def _real_ghz() -> str | None:
    return os.environ.get("TIERGATE_GHZ") or shutil.which("ghz")


@pytest.mark.skipif(_real_ghz() is None, reason="no ghz on PATH and no $TIERGATE_GHZ (build one with "
                    "../shared/tools/ghz/build.sh); CI has none")
def test_real_ghz_against_a_real_gateway(procs, tmp_path, tiny_model):
    ghz = Ghz(_real_ghz())
    assert ghz.check().startswith("v")
    gateway = procs.gateway(procs.inference(tiny_model), tmp_path / "l2", workers=2)
    timed = ghz.run(_spec(tmp_path, concurrency=4, connections=2, duration_s=1.0), gateway.address, tmp_path)
    assert timed.ok > 0 and timed.errors == {}  # --duration-stop wait: no call cut at the end
    assert 0.9 < timed.seconds < 30
    assert 0 < timed.p50_ms <= timed.p99_ms <= timed.max_ms < 10_000  # milliseconds, not nanoseconds
    assert timed.calls_per_s == pytest.approx(timed.ok / timed.seconds)
    batch = ghz.run(_spec(tmp_path, method="/tiergate.v1.Classifier/ClassifyBatch", batch=3, concurrency=2,
                          connections=2, duration_s=None, requests=6, unique=True), gateway.address, tmp_path)
    assert (batch.ok, batch.errors) == (6, {}) and batch.texts_per_s == pytest.approx(3 * batch.calls_per_s)
