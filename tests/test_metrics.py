"""Prometheus metrics: real processes scraped over HTTP, parsed with prometheus-client's own parser."""

from __future__ import annotations

import socket
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos import classifier_pb2, classifier_pb2_grpc
from protos.metrics import Family, Histogram, SnapshotCollector, sample_key
from tests.helpers import eventually
from tests.test_workers import classify_on_new_connection


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


CLASSIFY = dict(grpc_type="unary", grpc_service="tiergate.v1.Classifier", grpc_method="Classify")


def test_one_scrape_sums_every_worker(procs, tmp_path, tiny_model):
    """Known traffic moves each counter by exactly its amount, over 2 workers."""
    port = free_port()
    inference = procs.inference(tiny_model)
    gateway = procs.gateway(inference, tmp_path / "l2", None, "--metrics-port", str(port), workers=2)
    before = scrape(port)
    assert value(before, "grpc_server_started_total", **CLASSIFY) == 0

    with grpc.insecure_channel(gateway.address) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        call = lambda text: stub.Classify(classifier_pb2.ClassifyRequest(text=text), timeout=10)  # noqa: E731
        assert call("one model answer, then two L1 hits").tier == classifier_pb2.TIER_MODEL
        assert call("one model answer, then two L1 hits").tier == classifier_pb2.TIER_L1
        assert call("one model answer, then two L1 hits").tier == classifier_pb2.TIER_L1
        with pytest.raises(grpc.RpcError) as refused:
            call("   ")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # New connections, which SO_REUSEPORT spreads over both workers: each a new text.
    for i in range(16):
        assert classify_on_new_connection(gateway.address, f"a new text on connection {i}").tier == classifier_pb2.TIER_MODEL

    def settled():
        s = scrape(port)  # the other worker publishes 4x a second: poll until its share is in
        return s if value(s, "grpc_server_started_total", **CLASSIFY) == 20 else None

    after = eventually(settled, timeout_s=10)
    assert value(after, "grpc_server_handled_total", **CLASSIFY, grpc_code="OK") == 19
    assert value(after, "grpc_server_handled_total", **CLASSIFY, grpc_code="INVALID_ARGUMENT") == 1
    assert value(after, "grpc_server_handling_seconds_count", **CLASSIFY) == 20
    assert value(after, "grpc_server_handling_seconds_bucket", **CLASSIFY, le="+Inf") == 20
    assert value(after, "tiergate_answers_total", tier="model") == 17
    assert value(after, "tiergate_answers_total", tier="l1") == 2
    assert value(after, "tiergate_answers_total", tier="l2") == 0
    assert value(after, "tiergate_cache_hits_total", tier="l1") == 2
    assert value(after, "tiergate_cache_misses_total", tier="l1") == 17
    assert value(after, "tiergate_refusals_total", reason="invalid_argument") == 1
    assert value(after, "tiergate_pending_misses") == 0
    assert value(after, "tiergate_l2_budget_bytes") > 0
    info = [labels for (name, labels) in after if name == "tiergate_model_info"]
    assert len(info) == 1 and dict(info[0])["fingerprint"] in gateway.ready_line
    # No label anywhere holds request text.
    assert not any("connection" in v or "L1 hits" in v for _name, labels in after for _k, v in labels)


def test_serve_shows_its_inference_child_in_the_same_scrape(procs, tmp_path, tiny_model):
    port = free_port()
    serve = procs.start("serve", "--port", "0", "--workers", "1", "--model", str(tiny_model),
                        "--lmdb-path", str(tmp_path / "l2"), "--metrics-port", str(port))
    with grpc.insecure_channel(serve.address) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        texts = [f"text number {i} for the batch" for i in range(5)]
        stub.ClassifyBatch(classifier_pb2.ClassifyBatchRequest(texts=texts), timeout=20)
        # A stream left open past its deadline: the client sees DEADLINE_EXCEEDED, and so does the metric.
        import threading

        hold = threading.Event()

        def requests():
            yield classifier_pb2.ClassifyRequest(text=texts[0])
            hold.wait(10)

        replies = stub.ClassifyStream(requests(), timeout=1.0)
        with pytest.raises(grpc.RpcError) as late:
            list(replies)
        hold.set()
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stream = dict(grpc_type="bidi_stream", grpc_service="tiergate.v1.Classifier", grpc_method="ClassifyStream")
    eventually(lambda: value(scrape(port), "grpc_server_handled_total", **stream, grpc_code="DEADLINE_EXCEEDED") == 1,
               timeout_s=10)
    s = scrape(port)
    assert value(s, "tiergate_inference_texts_scored_total") == 5
    assert value(s, "tiergate_inference_texts_received_total") == 5  # every text went over the stream once
    assert 1 <= value(s, "tiergate_inference_stream_messages_total") <= 5
    assert value(s, "tiergate_inference_forward_seconds_count") == value(s, "tiergate_inference_batches_total") >= 1
    assert value(s, "tiergate_inference_batch_texts_sum") == 5
    assert value(s, "tiergate_inference_queue_wait_seconds_count") == 5
    assert value(s, "tiergate_inference_queue_depth") == 0
    assert value(s, "tiergate_answers_total", tier="model") == 5
    assert value(s, "grpc_server_handled_total", grpc_type="unary", grpc_service="tiergate.v1.Classifier",
                 grpc_method="ClassifyBatch", grpc_code="OK") == 1


def test_standalone_inference_serves_its_own(procs, tiny_model):
    port = free_port()
    inference = procs.inference(tiny_model, "--metrics-port", str(port))
    gateway = procs.gateway(inference, None)
    with grpc.insecure_channel(gateway.address) as channel:
        classifier_pb2_grpc.ClassifierStub(channel).Classify(classifier_pb2.ClassifyRequest(text="hello"), timeout=10)
    s = scrape(port)
    assert value(s, "tiergate_inference_texts_scored_total") == 1
    assert [labels for (name, labels) in s if name == "tiergate_model_info"]


def test_a_taken_metrics_port_is_named(procs, tiny_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError) as failed:
            procs.inference(tiny_model, "--metrics-port", str(port))
    assert f"cannot serve metrics on 127.0.0.1:{port}" in str(failed.value)
    assert "Traceback" not in str(failed.value)


def test_snapshots_add_up_into_cumulative_histograms():
    a, b = Histogram((0.1, 1.0)), Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        a.observe(v)
    b.observe(0.05)
    summed = {k: a.samples("x_seconds", m="M").get(k, 0) + b.samples("x_seconds", m="M").get(k, 0)
              for k in a.samples("x_seconds", m="M")}
    summed[sample_key("y_total", reason="r")] = 3
    collector = SnapshotCollector([Family("x_seconds", "histogram", "h", ("m",)),
                                   Family("y", "counter", "c", ("reason",))], lambda: summed)
    families = {f.name: f for f in collector.collect()}
    buckets = {s.labels["le"]: s.value for s in families["x_seconds"].samples if s.name == "x_seconds_bucket"}
    assert buckets == {"0.1": 2, "1.0": 3, "+Inf": 4}
    assert [s.value for s in families["y"].samples if s.name == "y_total"] == [3]


def test_a_dead_workers_counters_stay_in_the_sum_but_not_its_gauges(tmp_path):
    import json
    import subprocess
    import sys

    from gateway.metrics import is_monotonic
    from gateway.stats_board import StatsBoard

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs: a worker that died
    counter, gauge = sample_key("tiergate_answers_total", tier="l1"), sample_key("tiergate_pending_misses")
    (tmp_path / f"{gone.pid}.json").write_text(json.dumps({"metrics": {counter: 5.0, gauge: 3.0}}))
    board = StatsBoard(str(tmp_path))
    own = {counter: 2.0, gauge: 1.0}
    summed, workers = board.total("metrics", own, monotonic=is_monotonic)
    assert summed == {counter: 7.0, gauge: 1.0} and workers == 1
    # Its file gone too (withdrawn): the last counters it published still count.
    (tmp_path / f"{gone.pid}.json").unlink()
    assert board.total("metrics", own, monotonic=is_monotonic)[0][counter] == 7.0
    # GetStats' counters are of live workers only, as before.
    assert board.total("metrics", own)[0] == own
