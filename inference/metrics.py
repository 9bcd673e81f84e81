"""The inference service's Prometheus metrics (counted plainly; see protos.metrics).

`tiergate inference --metrics-port` serves them itself. Under `serve` the
gateway asks its own inference child for them (Inference.GetStats carries the
samples) and shows them in its one scrape, next to its own.
"""

from __future__ import annotations

from typing import Mapping

from protos.metrics import Family, sample_key

__all__ = ["INFERENCE_FAMILIES", "MODEL_INFO", "inference_samples", "model_info_sample"]

MODEL_INFO = Family("tiergate_model_info", "gauge", "1, labelled with the model that scores misses",
                    ("model_id", "fingerprint", "precision", "device"))

INFERENCE_FAMILIES = (
    Family("tiergate_inference_queue_depth", "gauge", "texts waiting for the model"),
    Family("tiergate_inference_queue_wait_seconds", "histogram",
           "time from a text's arrival to the start of its forward pass"),
    Family("tiergate_inference_forward_seconds", "histogram", "duration of one forward pass (one batch)"),
    Family("tiergate_inference_batch_texts", "histogram", "texts per forward pass"),
    Family("tiergate_inference_batch_tokens", "histogram",
           "padded tokens per forward pass (texts x the longest text's tokens, as the model's tokenizer counts them)"),
    Family("tiergate_inference_cpu_seconds", "counter",
           "CPU seconds of the threads that tokenize and that run the model (forward)", ("stage",)),
    Family("tiergate_inference_texts_scored", "counter", "texts the model scored"),
    Family("tiergate_inference_batches", "counter", "forward passes"),
    Family("tiergate_inference_stream_messages", "counter",
           "Score stream messages received from gateways (texts_received / this: texts per message)"),
    Family("tiergate_inference_texts_received", "counter", "texts received in Score stream messages"),
    Family("tiergate_inference_batch_errors", "counter", "forward passes (or tokenizations) that failed"),
    Family("tiergate_inference_texts_dropped", "counter",
           "texts dropped before their forward pass: their deadline passed (expired) or the caller left (cancelled)",
           ("reason",)),
    Family("tiergate_inference_refusals", "counter",
           "texts refused at once: queue_full (--max-queue), queue_wait (--max-queue-wait-ms), invalid (over the "
           "service's own limits), unauthenticated (no valid bearer token: a whole call)", ("reason",)),
)

# The batcher's (and the servicer's) plain counters, as samples.
_COUNTER_SAMPLES = {
    "texts_scored": sample_key("tiergate_inference_texts_scored_total"),
    "batches": sample_key("tiergate_inference_batches_total"),
    "score_messages": sample_key("tiergate_inference_stream_messages_total"),
    "score_items": sample_key("tiergate_inference_texts_received_total"),
    "batch_errors": sample_key("tiergate_inference_batch_errors_total"),
    "dropped_expired": sample_key("tiergate_inference_texts_dropped_total", reason="expired"),
    "dropped_cancelled": sample_key("tiergate_inference_texts_dropped_total", reason="cancelled"),
    "rejected_full": sample_key("tiergate_inference_refusals_total", reason="queue_full"),
    "rejected_wait": sample_key("tiergate_inference_refusals_total", reason="queue_wait"),
    "rejected_invalid": sample_key("tiergate_inference_refusals_total", reason="invalid"),
}


def inference_samples(counters: Mapping[str, int], depth: int, histograms: Mapping[str, float]) -> dict[str, float]:
    """Every inference family's samples but the model's info (which the gateway has its own copy of)."""
    out = {sample: float(counters.get(name, 0)) for name, sample in _COUNTER_SAMPLES.items()}
    out[sample_key("tiergate_inference_queue_depth")] = float(depth)
    out.update(histograms)
    return out


def model_info_sample(model_id: str, fingerprint: str, precision: str, device: str) -> dict[str, float]:
    # Label values must not hold the separators of a sample key (a model id is a path or a hub id).
    clean = lambda v: v.replace("|", "/").replace("=", ":")  # noqa: E731
    return {sample_key(MODEL_INFO.name, model_id=clean(model_id), fingerprint=clean(fingerprint),
                       precision=clean(precision), device=clean(device)): 1.0}
