"""Model loading through the project's loader (real tiny checkpoints)."""

from __future__ import annotations

import os
import threading

import pytest

import inference.model as model_module
from inference.model import INT8_MEASURED_AS, ModelConfig, SequenceClassifier


def load(path, **kw):
    model = SequenceClassifier(ModelConfig(source=str(path), **kw))
    return model, model.load()


def test_fingerprint_tracks_weights_and_precision(tiny_model, other_tiny_model):
    _, a = load(tiny_model)
    _, a_again = load(tiny_model)
    _, b = load(other_tiny_model)
    _, a_int8 = load(tiny_model, quantize=True)
    assert a.fingerprint == a_again.fingerprint
    assert len({a.fingerprint, b.fingerprint, a_int8.fingerprint}) == 3
    assert (a.model_id, a.labels, a.dtype, a.device) == ("tiny-bert-seed0", ("negative", "positive"), "float32", "cpu")
    assert a_int8.dtype == "int8-dynamic"


def test_scores_are_the_top_label_and_its_probability(tiny_model):
    model, _ = load(tiny_model)
    results = model.score(["a short text", "a somewhat longer text with more words in it", "x"])
    assert len(results) == 3
    for label, score in results:
        assert label in ("negative", "positive") and 0.5 <= score <= 1.0
    # Batched and one-by-one agree (padding must not change a text's score).
    for text, (label, score) in zip(["a short text", "x"], [results[0], results[2]]):
        assert model.score([text])[0] == (label, pytest.approx(score, abs=1e-5))


def test_missing_model_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load(tmp_path / "does-not-exist")


def test_unreachable_hub_id_says_what_to_do(monkeypatch):
    import huggingface_hub.constants

    # No hub here; offline mode makes the lookup fail at once instead of retrying.
    # (The env var is read when huggingface_hub is imported, so patch the constant.)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="Give a local checkpoint directory"):
        load("some-org/not-a-local-model")


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        ModelConfig(source="x", threads=0)
    with pytest.raises(ValueError, match="device must be"):
        ModelConfig(source="x", device="tpu")


@pytest.mark.parametrize("record, expected", [
    ({"accuracy_int8": 0.895, "int8_measured_as": INT8_MEASURED_AS}, "int8-dynamic"),
    ({"accuracy_int8": 0.85, "int8_measured_as": INT8_MEASURED_AS}, "float32"),
    # Builds that scored int8 in padded batches measured answers int8 no longer gives.
    ({"accuracy_int8": 0.895}, "float32"),
])
def test_auto_quantization_follows_the_measured_accuracy_loss(tiny_model, tmp_path, record, expected):
    import json
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    (model_dir / "tiergate_build.json").write_text(json.dumps({"accuracy": 0.9, **record}))
    _, info = load(model_dir)  # quantize=None: auto
    assert info.dtype == expected
    assert info.max_batch_texts == (1 if expected == "int8-dynamic" else None)


def test_auto_quantization_is_off_for_models_nobody_measured(tiny_model):
    _, info = load(tiny_model)
    assert info.dtype == "float32"


@pytest.mark.parametrize(
    "cores, device, lanes, threads, expected",
    [
        (2, "cpu", None, None, (2, 1)),    # one single-threaded pass per core
        (8, "cpu", None, None, (4, 2)),    # at most 4 lanes; the cores shared out
        (8, "cpu", None, 4, (2, 4)),       # threads given: as many lanes as fit
        (8, "cpu", 3, None, (3, 2)),       # lanes given: their share of the cores
        (8, "cuda", None, None, (1, 8)),   # one lane feeds a GPU
        (1, "cpu", None, None, (1, 1)),
    ],
)
def test_lanes_and_threads_are_planned_from_the_cores(monkeypatch, cores, device, lanes, threads, expected):
    monkeypatch.setattr(model_module, "available_cores", lambda: cores)
    assert model_module.plan_lanes(device, lanes, threads) == expected


def test_each_lane_thread_runs_torch_with_the_planned_thread_count(tiny_model):
    import torch

    model, info = load(tiny_model, lanes=2, threads=1, nice=3)
    assert (info.lanes, info.threads) == (2, 1)
    seen, niceness = [], []

    def lane():
        model.score(["a text"])
        seen.append(torch.get_num_threads())
        niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    workers = [threading.Thread(target=lane) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert seen == [1, 1]  # not one thread per core each, which would oversubscribe the cores
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert niceness == [min(19, base + 3)] * 2  # the model yields cores to the threads answering calls
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # only the lanes


def test_torchscript_serves_the_same_answers_as_the_model(tiny_model):
    traced, traced_info = load(tiny_model)  # auto: on a CPU
    eager, eager_info = load(tiny_model, torchscript=False)
    assert (traced_info.graph, eager_info.graph) == ("torchscript", "eager")
    assert traced_info.fingerprint == eager_info.fingerprint  # same weights, so the same cache keys
    batches = [["x"], ["a short text", "a much longer text than the first one, with more words in it"],
               [f"text {i} " * (i + 1) for i in range(7)], ["long " * 600]]  # the last is truncated at max_length
    for texts in batches:
        for (label, score), (want_label, want_score) in zip(traced.score(texts), eager.score(texts)):
            assert label == want_label and score == pytest.approx(want_score, abs=1e-5)


def test_loading_logs_no_loss_type_warning(tiny_model, caplog):
    # transformers warns about an unset loss_type when tracing reads model.loss_function; no loss is computed here.
    _, info = load(tiny_model)
    assert info.graph == "torchscript"
    assert "loss_type" not in caplog.text


def test_a_traced_graph_that_fails_its_check_is_not_served(tiny_model, monkeypatch, caplog):
    import inference.torchscript as torchscript

    monkeypatch.setattr(torchscript, "MAX_LOGIT_DIFF", -1.0)  # no graph can pass the check now
    _, info = load(tiny_model)
    assert info.graph == "eager"
    assert "serving the model without TorchScript: the traced graph's logits differ" in caplog.text
    with pytest.raises(RuntimeError, match="--torchscript on: the traced graph's logits differ"):
        load(tiny_model, torchscript=True)
