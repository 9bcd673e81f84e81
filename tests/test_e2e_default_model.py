"""The real default model, end to end through the gateway."""

from __future__ import annotations

from protos import classifier_pb2

PLAIN = {
    "I love this, it is wonderful": "positive",
    "What a fantastic day, everything went right": "positive",
    "Great service and friendly staff, highly recommended": "positive",
    "This is terrible, I hate it": "negative",
    "worst service ever, very disappointed": "negative",
    "The package arrived broken and nobody answers my emails": "negative",
}


def test_default_model_labels_plain_sentences(procs, connect, tmp_path, default_model_build):
    inference = procs.inference(default_model_build.path)
    client = connect(procs.gateway(inference, tmp_path / "l2"))
    results = client.batch(list(PLAIN))
    assert {text: r.label for text, r in zip(PLAIN, results)} == PLAIN
    assert all(r.tier == classifier_pb2.TIER_MODEL and r.score > 0.8 for r in results)
    assert results[0].model.startswith("tiergate-sentiment-minilm-v1@")
    # The same texts one by one: now from L1, same answers.
    for text, first in zip(PLAIN, results):
        again = client.classify(text)
        assert (again.tier, again.label) == (classifier_pb2.TIER_L1, first.label)
