"""The chaos scenario's oracle, its verdict and its report.

The oracle: the model's own answer for each distinct text, computed alone:
a fresh `tiergate inference` process (--max-batch-texts 1), fed one text per
Score message and waited for before the next, so no other text ever shares
its batch. A text is scored in its normalized form (cache.keys.normalize_text),
as the gateway scores and keys it.

verdict(): every answer against the oracle (wrong: another label, a score
more than WRONG_SCORE away, or another model than the one that scored it),
and PASS only with 0 wrong, 0 lost, 0 hung and no error codes outside ALLOWED.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc

from cache.keys import normalize_text
from gateway.bench.chaos_traffic import ALLOWED, CODE_NAMES, EXAMPLES, Tally
from gateway.bench.pyload import percentiles
from gateway.children import Child
from protos import inference_pb2, inference_pb2_grpc

__all__ = ["Truth", "score_alone", "judge", "verdict", "render", "WRONG_SCORE", "INVARIANT"]

WRONG_SCORE = 1e-4   # a score this far from the one computed alone is a wrong answer
INVARIANT = 1e-5     # the issue's batch-invariance bound: reported, not judged
ORACLE_TRIES = 3     # a text the oracle could not score (e.g. RESOURCE_EXHAUSTED) is tried again
# Score streams at once, each one text at a time: with --max-batch-texts 1 every
# text is still alone in its model call, and the inference lanes are all used.
ORACLE_STREAMS = 2


@dataclass
class Truth:
    model: str                            # "<model id>@<fingerprint>" of the oracle's model
    answers: dict[str, tuple[str, float]]  # normalized text -> (label, score) scored alone
    failures: dict[str, str]              # normalized text -> why the oracle has no answer for it
    seconds: float


async def _result_for(call, item_id: int) -> tuple:
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:
            raise RuntimeError("the oracle's Score stream ended")
        for result in response.results:
            if result.id == item_id:
                return result, getattr(result, "fingerprint", "") or response.fingerprint


async def score_alone(texts: list[str], *, model: str | None, extra_args: tuple[str, ...], log: Path,
                      env: dict) -> Truth:
    """Each text scored alone on a fresh inference process (see the module doc)."""
    argv = [sys.executable, "-m", "gateway", "inference", "--port", "0", "--metrics-port", "0", "--max-batch-texts", "1",
            "--max-wait-ms", "0", *(["--model", model] if model else []), *extra_args]
    t0 = time.monotonic()
    with open(log, "a", encoding="utf-8", buffering=1) as out:
        child = Child("oracle inference", argv, env=env, output=out.write, stderr=subprocess.STDOUT,
                      new_session=True).start()
        try:
            await child.ready(900)
            print(f"oracle: scoring {len(texts)} distinct texts one at a time ({child.ready_line})",
                  file=sys.stderr, flush=True)
            async with grpc.aio.insecure_channel(child.address) as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                info = await stub.Describe(inference_pb2.DescribeRequest(), timeout=60)
                answers, failures = {}, {}
                await asyncio.gather(*(_score_each(stub, texts[i::ORACLE_STREAMS], info.fingerprint, answers,
                                                   failures) for i in range(ORACLE_STREAMS)))
        finally:
            await child.stop_async(timeout_s=30)
            await asyncio.to_thread(child.wait, 10)  # all its output in the log before the log closes
    return Truth(f"{info.model_id}@{info.fingerprint}", answers, failures, round(time.monotonic() - t0, 1))


async def _score_each(stub, texts: list[str], fingerprint: str, answers: dict, failures: dict) -> None:
    """Texts one by one on one Score stream: each sent alone, waited for before the next."""
    call, ids = stub.Score(), itertools.count(1)  # ids are unique per stream, retries included
    for text in texts:
        for _ in range(ORACLE_TRIES):
            item_id = next(ids)
            await call.write(inference_pb2.ScoreRequest(items=[inference_pb2.ScoreItem(id=item_id, text=text)]))
            result, scored_by = await asyncio.wait_for(_result_for(call, item_id), 120)
            if result.code == 0 and scored_by == fingerprint:
                answers[text] = (result.label, result.score)
                failures.pop(text, None)
                break
            failures[text] = (f"{CODE_NAMES.get(result.code, result.code)}: {result.message}" if result.code
                              else f"scored by {scored_by}, not {fingerprint}")
            await asyncio.sleep(0.1)
    await call.done_writing()
    call.cancel()


def judge(seen: dict, truth: Truth) -> dict:
    """Every answer against the oracle's; counts are answers (a text answered 5 times counts 5)."""
    out = {"answers_checked": 0, "wrong": 0, "unchecked": 0, "max_score_diff": 0.0, "over_invariance_bound": 0,
           "wrong_by_tier": Counter(), "wrong_by_phase": Counter(), "wrong_examples": []}
    for (text, label, score, model, tier), (times, phase) in seen.items():
        expected = truth.answers.get(normalize_text(text))
        if expected is None:
            out["unchecked"] += times
            continue
        out["answers_checked"] += times
        diff = abs(score - expected[1])
        out["max_score_diff"] = max(out["max_score_diff"], diff)
        if diff > INVARIANT:
            out["over_invariance_bound"] += times
        why = [w for w, bad in (("label", label != expected[0]), ("score", diff > WRONG_SCORE),
                                ("model", model != truth.model)) if bad]
        if why:
            out["wrong"] += times
            out["wrong_by_tier"][tier] += times
            out["wrong_by_phase"][phase] += times
            if len(out["wrong_examples"]) < EXAMPLES:
                out["wrong_examples"].append({"text": text[:80], "why": why, "times": times, "phase": phase,
                                              "got": [label, score, model, tier], "alone": list(expected)})
    return out


def _traceback_counts(logs: Path) -> dict[str, int]:
    out = {}
    for path in sorted(logs.glob("*.log")):
        out[path.stem] = path.read_text(errors="replace").count("Traceback (most recent call last)")
    return out


def verdict(tally: Tally, truth: Truth, *, faults: list, broken: list, rss: dict, traffic_s: float,
            logs: Path) -> dict:
    judged = judge(tally.seen, truth)
    codes = Counter()
    for key, n in tally.calls.items():
        codes[key.rpartition(" ")[2]] += n
    bad_codes = sorted(c for c in set(codes) | set(tally.item_errors) if c not in ALLOWED)
    why = list(broken)
    for n, what in ((judged["wrong"], "wrong answers"), (tally.lost, "lost answers"), (tally.hung_calls, "hung calls"),
                    (judged["unchecked"], "answers the oracle could not check")):
        if n:
            why.append(f"{n} {what}")
    why += [f"{codes[c] + tally.item_errors[c]} x {c}: {', '.join(tally.reasons[c])[:300]}" for c in bad_codes]
    windows = [{"phase": phase, "ok_calls": len(lat), "p99_ms": percentiles(lat).get("p99"),
                "errors": dict(tally.phase_errors.get(phase, {}))} for phase, lat in tally.latency.items()]
    return {
        "chaos": 1, "verdict": "FAIL" if why else "PASS", "failed_because": why,
        "traffic_s": round(traffic_s, 1), "model": truth.model,
        **{k: (dict(v) if isinstance(v, Counter) else v) for k, v in judged.items()},
        "distinct_texts": len(truth.answers), "oracle_failures": dict(list(truth.failures.items())[:EXAMPLES]),
        "oracle_s": truth.seconds, "lost": tally.lost, "lost_examples": tally.lost_examples,
        "hung": tally.hung_calls, "hung_examples": tally.hung_examples, "odd_error_examples": dict(tally.odd_examples),
        "statuses": dict(codes), "calls_by_kind": dict(tally.calls), "stream_item_errors": dict(tally.item_errors),
        "streams_cut_short": dict(tally.streams_cut),
        "reasons": {code: dict(r.most_common()) for code, r in tally.reasons.items()},
        "windows": windows, "faults": faults, "rss_mb": rss, "tracebacks_logged": _traceback_counts(logs),
        "logs": str(logs),
    }


def render(result: dict, json_path: Path) -> str:
    """One JSON line, then a short table for people; also writes json_path."""
    json_path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    r = result
    lines = [json.dumps(result, separators=(",", ":")), "",
             f"chaos {r['verdict']}: {r['traffic_s']:g} s of traffic, {len(r['faults'])} faults, model {r['model']}",
             f"answers checked {r['answers_checked']} ({r['distinct_texts']} distinct texts, each scored alone in "
             f"{r['oracle_s']:g} s), wrong {r['wrong']}, lost {r['lost']}, hung {r['hung']}, unchecked "
             f"{r['unchecked']}; max |score - alone| {r['max_score_diff']:.3g} ({r['over_invariance_bound']} answers "
             f"over {INVARIANT:g})",
             "statuses (calls): " + ", ".join(f"{c} {n}" for c, n in sorted(r["statuses"].items(), key=lambda x: -x[1]))
             + ("; stream texts answered with an error: " + ", ".join(f"{c} {n}" for c, n in
                                                                     r["stream_item_errors"].items())
                if r["stream_item_errors"] else "")]
    for code, reasons in r["reasons"].items():
        lines += [f"  {code} {n}: {reason}" for reason, n in list(reasons.items())[:4]]
    lines += ["", f"{'window':<22}{'ok calls':>9}{'p99 ms':>10}  errors"]
    for w in r["windows"]:
        p99 = f"{w['p99_ms']:.1f}" if w["p99_ms"] is not None else "-"
        lines.append(f"{w['phase']:<22}{w['ok_calls']:>9}{p99:>10}  "
                     + ", ".join(f"{c} {n}" for c, n in w["errors"].items()))
    lines.append("")
    lines += [f"{f['name']} at {f['at_s']:g} s for {f['seconds']:g} s: {f['note']}; a new text answered "
              f"{f['new_text_answered_after_s']} s after" for f in r["faults"]]
    lines.append("RSS of the stack (redis + inference + gateway and its workers), MB: "
                 + ", ".join(f"{k} {v:g}" for k, v in r["rss_mb"].items()))
    lines.append("tracebacks in the logs: " + ", ".join(f"{k} {v}" for k, v in r["tracebacks_logged"].items())
                 + f" ({r['logs']})")
    if r["wrong"]:
        lines.append("wrong answers by tier: " + ", ".join(f"{t} {n}" for t, n in r["wrong_by_tier"].items())
                     + "; by window: " + ", ".join(f"{p} {n}" for p, n in r["wrong_by_phase"].items()))
    lines += [f"wrong: {example}" for example in r["wrong_examples"][:3]]
    lines += [f"{code}, which no fault explains: {examples[0]}" for code, examples in r["odd_error_examples"].items()]
    lines.append(f"{r['verdict']}" + (": " + "; ".join(r["failed_because"]) if r["failed_because"] else
                                      ": 0 wrong, 0 lost, 0 hung, only " + ", ".join(sorted(ALLOWED - {'OK'}))))
    lines.append(f"wrote {json_path}")
    return "\n".join(lines)
