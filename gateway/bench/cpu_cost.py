"""Where a core goes per miss: CPU seconds of each part of the stack, per text.

Read before and after the miss scenario's measured run:
- every process of the stack from /proc/PID/stat (user + system time), by
  role (the gateway processes, the inference child);
- inside the inference child, the CPU of the threads that tokenize and that
  run the model (tiergate_inference_cpu_seconds_total{stage}, from the
  gateway's /metrics, which carries its inference child's samples).

The inference child's remaining CPU is its event loop: the Score stream
(parsing, sending), the batcher and result delivery. Divided by the texts
scored in the run, each is milliseconds of a core per text; together they
are what one miss costs, and what the stack adds to the model is everything
but the forward pass.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from gateway.bench.procs import _cmdline, descendants, role_of

__all__ = ["CpuReading", "read_cpu", "cost_per_text"]

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")

CpuReading = dict[str, float]  # part -> CPU seconds so far


def _proc_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) * _TICK_S  # utime, stime (fields 14, 15 of stat)


def _stage_cpu(metrics_port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tiergate_inference_cpu_seconds_total":
                out[sample.labels["stage"]] = sample.value
            elif sample.name == "tiergate_inference_texts_scored_total":
                out["texts_scored"] = sample.value
            elif sample.name == "tiergate_inference_stream_messages_total":
                out["stream_messages"] = sample.value
            elif sample.name == "tiergate_inference_texts_received_total":
                out["texts_received"] = sample.value
    return out


def read_cpu(root_pid: int, metrics_port: int | None) -> CpuReading:
    """CPU seconds so far of the stack under root_pid, by part."""
    out: CpuReading = {"gateway": 0.0, "inference": 0.0}
    for pid in descendants(root_pid):
        role = role_of(_cmdline(pid))
        seconds = _proc_cpu_s(pid)
        if seconds is None:
            continue
        key = "inference" if role == "inference" else "gateway" if "gateway" in role or "serve" in role else None
        if key is not None:
            out[key] += seconds
    if metrics_port:
        stages = _stage_cpu(metrics_port)
        out["tokenize"] = stages.get("tokenize", 0.0)
        out["forward"] = stages.get("forward", 0.0)
        out["texts_scored"] = stages.get("texts_scored", 0.0)
        out["stream_messages"] = stages.get("stream_messages", 0.0)
        out["texts_received"] = stages.get("texts_received", 0.0)
    return out


def cost_per_text(before: CpuReading, after: CpuReading, wall_s: float) -> dict | None:
    """Milliseconds of a core per text scored, by part; None without the inference child's numbers."""
    texts = after.get("texts_scored", 0.0) - before.get("texts_scored", 0.0)
    if "forward" not in after or texts <= 0:
        return None
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    messages = d.pop("stream_messages", 0.0)
    received = d.pop("texts_received", 0.0)
    parts = {
        "gateway (calls, cache, stream to the model)": d["gateway"],
        "inference event loop (stream, batching, delivery)": d["inference"] - d["tokenize"] - d["forward"],
        "tokenize": d["tokenize"],
        "forward pass": d["forward"],
    }
    ms = {name: round(1000 * s / texts, 3) for name, s in parts.items()}
    total = sum(parts.values())
    return {"texts": int(texts), "ms_per_text": ms, "total_ms_per_text": round(1000 * total / texts, 3),
            "stack_share": round(1 - d["forward"] / total, 4) if total > 0 else None,
            "cores_busy": round(total / wall_s, 2) if wall_s > 0 else None,
            "texts_per_message": round(received / messages, 2) if messages > 0 else None}
