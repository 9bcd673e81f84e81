"""The onnxruntime runtime: the exported graph answers as the model does, alone or
in any batch, in a process without torch; it is exported again when the
checkpoint changes, and torch serves what onnxruntime cannot."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest

from inference.model import BATCH_INVARIANCE_TOLERANCE, ModelConfig, SequenceClassifier
from inference.onnx_model import OnnxClassifier, OnnxUnavailable, graph_dir
from inference.probes import PROBE_TEXTS
from inference.runtime import load_classifier

TEXTS = PROBE_TEXTS + [f"review {i}: " + "a fine and bright wine " * (i % 9) for i in range(30)]


@pytest.fixture
def cache_env(cache_dir, monkeypatch):
    monkeypatch.setenv("TIERGATE_CACHE_DIR", str(cache_dir))


def onnx(model_dir, **kw) -> OnnxClassifier:
    classifier = OnnxClassifier(ModelConfig(source=str(model_dir), lanes=1, **kw))
    classifier.load()
    return classifier


def test_the_graph_answers_as_the_model_alone_and_in_batches(tiny_model, cache_env):
    graph = onnx(tiny_model)
    torch_model = SequenceClassifier(ModelConfig(source=str(tiny_model), lanes=1, torchscript=False))
    torch_model.load()
    assert graph.info.graph == "onnxruntime" and graph.info.max_batch_texts is None
    assert graph.info.labels == torch_model.info.labels and graph.info.model_id == torch_model.info.model_id
    assert graph.info.fingerprint != torch_model.info.fingerprint  # another runtime: other last bits, other keys
    alone = [graph.score([t])[0] for t in TEXTS]
    want = [torch_model.score([t])[0] for t in TEXTS]
    assert [label for label, _ in alone] == [label for label, _ in want]
    assert max(abs(a - b) for (_, a), (_, b) in zip(alone, want)) <= 1e-5
    for size in (2, 4, 7):
        batched = [r for i in range(0, len(TEXTS), size) for r in graph.score(TEXTS[i:i + size])]
        assert [label for label, _ in batched] == [label for label, _ in alone]
        assert max(abs(a - b) for (_, a), (_, b) in zip(batched, alone)) <= BATCH_INVARIANCE_TOLERANCE


def test_serving_with_onnxruntime_imports_no_torch(tiny_model, cache_dir, cache_env):
    onnx_dir = graph_dir(tiny_model)  # exported by the test above or now, in its own process
    code = ("import sys; from inference.runtime import load_classifier; from inference.model import ModelConfig;"
            f"m = load_classifier(ModelConfig(source={str(tiny_model)!r}, lanes=1)); print(m.info.graph);"
            "print(m.score(['a text'])[0][0]); print([x for x in ('torch', 'transformers') if x in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TIERGATE_CACHE_DIR": str(cache_dir)})
    assert done.returncode == 0, done.stderr
    graph, label, heavy = done.stdout.split("\n")[:3]
    assert graph == "onnxruntime" and label in ("negative", "positive") and heavy == "[]"
    assert (onnx_dir / "model.onnx").is_file()


def test_a_changed_checkpoint_is_exported_again(tiny_model, other_tiny_model, tmp_path, cache_env):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    first = onnx(model_dir).info
    # Other weights under the same directory (same file names): the signature changes.
    for name in ("model.safetensors", "config.json"):
        shutil.copy(other_tiny_model / name, model_dir / name)
    second = onnx(model_dir).info
    assert second.fingerprint != first.fingerprint
    assert second.model_id == "tiny-bert-seed1"


def test_torch_serves_what_onnxruntime_cannot(tiny_model, tmp_path, cache_env, caplog):
    model_dir = tmp_path / "slow-tokenizer"
    shutil.copytree(tiny_model, model_dir)
    (model_dir / "tokenizer.json").unlink()  # a checkpoint with only a slow tokenizer
    with pytest.raises(OnnxUnavailable, match="tokenizer.json"):
        onnx(model_dir)
    with caplog.at_level(logging.WARNING):
        served = load_classifier(ModelConfig(source=str(model_dir), lanes=1, torchscript=False))
    assert isinstance(served, SequenceClassifier)
    assert "serving the model with torch: onnxruntime cannot serve it" in caplog.text
    with pytest.raises(RuntimeError, match="--runtime onnxruntime: .*tokenizer.json"):
        load_classifier(ModelConfig(source=str(model_dir), lanes=1, runtime="onnxruntime"))
    # And what torch alone does: int8 and an explicit --runtime torch.
    assert isinstance(load_classifier(ModelConfig(source=str(tiny_model), lanes=1, runtime="torch",
                                                  torchscript=False)), SequenceClassifier)
