"""`tiergate bench --scenarios chaos`: its bookkeeping and oracle catch what
they must (a wrong, lost or in-band-misplaced answer, a status no fault
explains), and a short run on a tiny model goes through every fault, checks
every answer and leaves no process behind.

The short run judges the product only where a fault cannot excuse it: no
answer may be wrong, lost or hung. Which error codes appear depends on timing,
so the full PASS/FAIL target is the bench's to print, not this test's.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.bench.chaos import FAULTS
from gateway.bench.chaos_oracle import Truth, judge, score_alone, verdict
from gateway.bench.chaos_traffic import Tally
from protos import classifier_pb2

MODEL = "tiny@abc"


def _answer(label: str, score: float, tier: int = classifier_pb2.TIER_L1, model: str = MODEL):
    return classifier_pb2.ClassifyResponse(label=label, score=score, tier=tier, model=model)


def _truth(**answers) -> Truth:
    return Truth(model=MODEL, answers=answers, failures={}, seconds=0.0)


def _verdict(tally: Tally, truth: Truth, tmp_path: Path) -> dict:
    return verdict(tally, truth, faults=[], broken=[], rss={}, traffic_s=1.0, logs=tmp_path)


def test_judge_counts_a_wrong_label_score_or_model_and_only_those():
    truth = _truth(a=("positive", 0.75), b=("negative", 0.6), c=("positive", 0.9), d=("negative", 0.55))
    seen = {
        ("a", "positive", 0.75, MODEL, "TIER_L1"): [3, "before"],            # right, 3 times
        ("  a\t", "positive", 0.750004, MODEL, "TIER_L2"): [1, "before"],    # right once normalized; over 1e-5 only
        ("b", "positive", 0.6, MODEL, "TIER_L3"): [2, "redis-garbage"],      # wrong label
        ("c", "positive", 0.9002, MODEL, "TIER_L2"): [1, "l2-damage"],       # score off by 2e-4
        ("d", "negative", 0.55, "other@ffff", "TIER_MODEL"): [1, "inference-kill"],  # another model's answer
        ("never scored", "positive", 0.5, MODEL, "TIER_L1"): [1, "before"],
    }
    out = judge(seen, truth)
    assert out["answers_checked"] == 8
    assert out["wrong"] == 4
    assert out["unchecked"] == 1
    assert out["over_invariance_bound"] == 1  # the 2e-4 one; 4e-6 is within the 1e-5
    assert dict(out["wrong_by_tier"]) == {"TIER_L3": 2, "TIER_L2": 1, "TIER_MODEL": 1}
    assert sorted(e["why"][0] for e in out["wrong_examples"]) == ["label", "model", "score"]
    assert out["max_score_diff"] == pytest.approx(2e-4, rel=1e-3)


def test_tally_counts_lost_answers_and_keeps_in_band_errors_apart():
    tally = Tally()
    error = classifier_pb2.ClassifyResponse(error=classifier_pb2.ItemError(code=8, message="queue full"))
    # A stream with one in-band error and one answer: nothing lost.
    assert tally.record("before", "stream", ["a", "b"], [error, _answer("positive", 0.7)], "OK", "", 0.01) == 1
    assert tally.lost == 0 and tally.item_errors == {"RESOURCE_EXHAUSTED": 1}
    # A stream that ends OK after 1 of 3 answers: 2 lost.
    tally.record("before", "stream", ["a", "b", "c"], [_answer("positive", 0.7)], "OK", "", 0.01)
    assert tally.lost == 2
    # A stream cut by UNAVAILABLE after one answer: the rest are that status's, not lost.
    tally.record("before", "stream", ["a", "b"], [_answer("positive", 0.7)], "UNAVAILABLE", "gone", 0.01)
    assert tally.lost == 2 and tally.streams_cut == {"UNAVAILABLE": 1}
    # OK with an empty answer, or a unary/batch answer carrying an in-band error: lost.
    tally.record("before", "unary", ["a"], [classifier_pb2.ClassifyResponse()], "OK", "", 0.01)
    tally.record("before", "batch", ["a", "b"], [_answer("positive", 0.7), error], "OK", "", 0.01)
    assert tally.lost == 4
    tally.hung("redis-freeze", "unary", 1, 0.5, 0)
    assert tally.hung_calls == 1 and tally.texts() == ["b", "a"]  # the answered ones, first answered first


def test_verdict_passes_only_allowed_codes_and_names_what_broke(tmp_path):
    truth = _truth(a=("positive", 0.75))
    tally = Tally()
    tally.record("before", "unary", ["a"], [_answer("positive", 0.75)], "OK", "", 0.01)
    tally.record("before", "unary", ["b"], [], "UNAVAILABLE", "the inference service at 1.2.3.4:5 is not reachable", 0.01)
    tally.record("before", "unary", ["c"], [], "DEADLINE_EXCEEDED", "Deadline Exceeded", 0.01)
    result = _verdict(tally, truth, tmp_path)
    assert result["verdict"] == "PASS", result["failed_because"]
    assert result["reasons"]["UNAVAILABLE"] == {"the inference service at N.N:N is not reachable": 1}

    tally.record("redis-kill", "batch", ["a"], [], "CANCELLED", "nobody waits for this text any more", 0.01)
    tally.record("redis-kill", "unary", ["a"], [_answer("negative", 0.75)], "OK", "", 0.01)
    result = _verdict(tally, truth, tmp_path)
    assert result["verdict"] == "FAIL"
    assert result["wrong"] == 1
    assert any("CANCELLED" in why and "nobody waits" in why for why in result["failed_because"])
    assert result["windows"][1]["phase"] == "redis-kill" and result["windows"][1]["errors"] == {"CANCELLED": 1}


def test_the_oracle_scores_alone_and_catches_a_tampered_answer(tiny_model, tmp_path, cache_dir):
    env = {**os.environ, "TIERGATE_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    texts = ["the delivery was great", "this update is broken", "lovely coffee today"]
    truth = asyncio.run(score_alone(texts, model=str(tiny_model), extra_args=(), log=tmp_path / "oracle.log",
                                    env=env))
    assert set(truth.answers) == set(texts) and not truth.failures
    assert truth.model.startswith("tiny-bert-seed0@")
    label, score = truth.answers[texts[0]]
    seen = {(t, *truth.answers[t], truth.model, "TIER_MODEL"): [1, "before"] for t in texts}
    assert judge(seen, truth)["wrong"] == 0
    seen[(texts[0], label, score + 0.01, truth.model, "TIER_L2")] = [1, "l2-damage"]  # a rotted score
    out = judge(seen, truth)
    assert out["wrong"] == 1 and out["wrong_examples"][0]["phase"] == "l2-damage"


def test_a_short_chaos_run_checks_every_answer_and_leaves_nothing_running(tiny_model, tmp_path, cache_dir):
    env = {**os.environ, "TIERGATE_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "--scenarios", "chaos", "--chaos-seconds", "20s",
         "--model", str(tiny_model), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode in (0, 1) and lines, proc.stderr[-3000:]
    result = json.loads(lines[0])
    assert result == json.loads((tmp_path / "out" / "chaos" / "chaos.json").read_text())
    assert [f["name"] for f in result["faults"]] == list(FAULTS)
    assert result["answers_checked"] > 100 and result["unchecked"] == 0
    windows = {w["phase"]: w for w in result["windows"]}
    assert windows["before"]["p99_ms"] is not None and "overload" in windows
    assert result["rss_mb"]["start"] > 0 and result["rss_mb"]["end"] > 0
    # What no fault excuses.
    assert (result["wrong"], result["lost"], result["hung"]) == (0, 0, 0), \
        (result["wrong_examples"], result["lost_examples"], result["hung_examples"])
    assert [pid for pid in result["stack_pids"] if _stack_process(pid)] == []


def _stack_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()  # empty for a zombie
    except OSError:
        return False
    return b"gateway" in cmdline or b"redis-server" in cmdline
