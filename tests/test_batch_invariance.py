"""A text's answer does not depend on the batch it was scored in (issue 9, item 1).

Texts of 1 to ~300 words are scored alone, then all at once in several orders,
through the path the inference service uses: a DynamicBatcher over the model's
tokenize() and forward(), with the batch policy BatcherConfig.for_model()
gives the loaded model. Every precision tiergate offers (float32, int8-dynamic)
must give the same score within 1e-5 and the same label.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from inference.batcher import BatcherConfig, DynamicBatcher
from inference.model import BATCH_INVARIANCE_TOLERANCE, ModelConfig, SequenceClassifier

_WORDS = ("good", "bad", "service", "never", "again", "love", "it", "slow", "refund", "great", "awful", "the")
# 36 texts of widely different lengths; the longest are truncated at max_length.
TEXTS = [" ".join(random.Random(i).choice(_WORDS) for _ in range(n))
         for i, n in enumerate([1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 300] * 3)]


def load(path, **kw) -> SequenceClassifier:
    model = SequenceClassifier(ModelConfig(source=str(path), **kw))
    model.load()
    return model


async def _score_alone_then_together(model: SequenceClassifier, config: BatcherConfig, orders: int = 2):
    info = model.info
    batcher = DynamicBatcher(model.forward, config.for_model(info), prepare_batch=model.tokenize, lanes=info.lanes)
    batcher.start()
    try:
        alone = [await batcher.submit(text) for text in TEXTS]  # one at a time: nothing else in its pass
        assert batcher.counters["batches"] == len(TEXTS)
        runs = []
        for seed in range(orders):
            order = random.Random(seed).sample(range(len(TEXTS)), len(TEXTS))
            results = await asyncio.gather(*(batcher.submit(TEXTS[i]) for i in order))  # all queued at once
            runs.append(dict(zip(order, results)))
        together_passes = batcher.counters["batches"] - len(TEXTS)
    finally:
        await batcher.close()
    return alone, runs, together_passes


def _assert_same_answers(alone, runs) -> None:
    for run in runs:
        labels = [run[i][0] for i in range(len(TEXTS))]
        assert labels == [label for label, _ in alone]
        worst = max(abs(run[i][1] - alone[i][1]) for i in range(len(TEXTS)))
        assert worst <= BATCH_INVARIANCE_TOLERANCE == 1e-5


@pytest.mark.parametrize("quantize", [False, True], ids=["float32", "int8-dynamic"])
def test_a_text_scores_the_same_alone_and_beside_any_neighbours(tiny_model, quantize):
    model = load(tiny_model, quantize=quantize)  # TorchScript on a CPU, as served
    alone, runs, passes = asyncio.run(_score_alone_then_together(model, BatcherConfig()))
    _assert_same_answers(alone, runs)
    if quantize:
        assert passes == 2 * len(TEXTS)  # one text per pass: no neighbours, no padding
    else:
        assert passes < 2 * len(TEXTS) / 2  # float32 really was batched, with padding


def test_float32_in_one_padded_pass_of_every_length_scores_the_same(tiny_model):
    model = load(tiny_model, quantize=False)
    wide = BatcherConfig(max_batch=len(TEXTS), max_tokens=65536)  # all queued at once: one pass
    alone, runs, passes = asyncio.run(_score_alone_then_together(model, wide))
    _assert_same_answers(alone, runs)
    assert passes == 2  # one pass per order: 1-word texts padded to 256 tokens beside the longest


def test_int8_dynamic_is_never_batched(tiny_model):
    """int8-dynamic quantizes each pass's activations with one scale: batched,
    a text's answer moves with its neighbours. No configuration batches it."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from inference.model import quantize_int8

    # The old failure mode, shown on the raw quantized model: one padded pass of mixed lengths.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    raw = quantize_int8(AutoModelForSequenceClassification.from_pretrained(tiny_model).eval())
    with torch.inference_mode():
        probs = lambda texts: torch.softmax(raw(**tokenizer(texts, padding=True, return_tensors="pt")).logits, -1)
        together = probs(TEXTS[:12])
        alone = torch.cat([probs([text]) for text in TEXTS[:12]])
    assert (together - alone).abs().max().item() > BATCH_INVARIANCE_TOLERANCE

    model = load(tiny_model, quantize=True)
    assert (model.info.dtype, model.info.max_batch_texts) == ("int8-dynamic", 1)
    assert BatcherConfig().for_model(model.info).max_batch == 1
    with pytest.raises(ValueError, match=r"--max-batch-texts 4: the int8-dynamic model scores at most 1 .*--quantize off"):
        BatcherConfig(max_batch=4).for_model(model.info)
    with pytest.raises(ValueError, match="a pass of 2 texts"):
        model.forward(model.tokenize(TEXTS[:2]))
    # score() cuts a list into passes of one: the same answers as one by one.
    assert model.score(TEXTS[:12]) == [model.score([text])[0] for text in TEXTS[:12]]


def test_the_inference_service_refuses_to_batch_int8(tiny_model):
    from inference.service import InferenceConfig, InferenceServer

    async def start() -> None:
        server = InferenceServer(InferenceConfig(ModelConfig(source=str(tiny_model), quantize=True, runtime="torch"),
                                                 BatcherConfig(max_batch=4), port=0))
        try:
            await server.start()
        finally:
            await server.stop(0)

    with pytest.raises(ValueError, match="--max-batch-texts 4"):
        asyncio.run(start())


def test_a_float_model_whose_answers_depend_on_the_batch_is_served_one_text_per_pass(tiny_model, monkeypatch,
                                                                                     caplog):
    import inference.model as model_module

    monkeypatch.setattr(model_module, "BATCH_INVARIANCE_TOLERANCE", -1.0)  # no model passes the load check now
    model = load(tiny_model, quantize=False)
    assert (model.info.dtype, model.info.max_batch_texts) == ("float32", 1)
    assert "this model's scores depend on the batch" in caplog.text
    assert BatcherConfig().for_model(model.info).max_batch == 1


@pytest.mark.parametrize("quantize", [None, True], ids=["auto", "int8-dynamic"])
def test_the_default_model_scores_a_text_the_same_alone_and_in_any_batch(default_model_build, quantize):
    model = load(default_model_build.path, quantize=quantize)
    alone, runs, _ = asyncio.run(_score_alone_then_together(model, BatcherConfig(), orders=1))
    _assert_same_answers(alone, runs)


def test_int8_answers_are_keyed_apart_from_answers_of_batched_int8(tiny_model):
    """Caches hold answers under the fingerprint: those int8 gave in batches
    (which depended on the batch) must not be served as one-text-per-pass answers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from inference.model import _fingerprint_source

    def before(dtype: bytes) -> str:  # the fingerprint as it was: weights, labels, tokenizer, dtype
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model)
        digest = _fingerprint_source(model, ("negative", "positive"), AutoTokenizer.from_pretrained(tiny_model))
        digest.update(dtype)
        return digest.hexdigest()[:16]

    assert load(tiny_model, quantize=True).info.fingerprint != before(b"int8-dynamic")
    assert load(tiny_model, quantize=False).info.fingerprint == before(b"float32")  # float32 answers did not change
