"""DynamicBatcher with a plain function standing in for the model (a unit test of the layer above it)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from inference.batcher import BatcherConfig, DeadlineExpired, DynamicBatcher, QueueFull


class RecordingModel:
    def __init__(self, fail: bool = False, drop_one: bool = False, gate: threading.Event | None = None):
        self.batches: list[list[str]] = []
        self.fail, self.drop_one, self.gate = fail, drop_one, gate

    def __call__(self, texts: list[str]) -> list[tuple[str, float]]:
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(list(texts))
        if self.fail:
            raise RuntimeError("boom")
        out = [(t.upper(), float(len(t))) for t in texts]
        return out[:-1] if self.drop_one else out


def run(coro):
    return asyncio.run(coro)


async def with_batcher(model, config, body):
    batcher = DynamicBatcher(model, config)
    batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.close()


def test_concurrent_texts_share_one_model_call_and_get_their_own_results():
    model = RecordingModel()

    async def body(b):
        return await asyncio.gather(*(b.submit(f"text {i}") for i in range(10)))

    results = run(with_batcher(model, BatcherConfig(max_batch=32, max_wait_s=0.05), body))
    assert results == [(f"TEXT {i}", float(len(f"text {i}"))) for i in range(10)]
    assert len(model.batches) == 1


def test_a_full_batch_goes_at_once_and_max_batch_is_respected():
    model = RecordingModel()

    async def body(b):
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.gather(*(b.submit(f"t{i}") for i in range(8)))
        return loop.time() - start

    took = run(with_batcher(model, BatcherConfig(max_batch=4, max_wait_s=0.5, max_queue=64), body))
    assert took < 0.4  # did not wait for max_wait_s: the batches were full
    assert [len(b) for b in model.batches] == [4, 4]


def test_texts_are_grouped_by_length():
    gate = threading.Event()
    model = RecordingModel(gate=gate)
    short = [f"s{i}" for i in range(4)]
    long = [" ".join(["word"] * 200) + str(i) for i in range(4)]

    async def body(b):
        futures = [b.submit(t) for pair in zip(short, long) for t in pair]  # interleaved arrival
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*futures)

    run(with_batcher(model, BatcherConfig(max_batch=4, max_wait_s=0.001, max_queue=64), body))
    groups = [set(b) for b in model.batches]
    assert set(short) in groups and set(long) in groups


def test_texts_are_grouped_by_the_tokens_the_model_counts_not_by_words():
    # Same words, very different token counts (as with emoji, URLs or rare
    # words): the model's count decides the groups, not the word estimate.
    gate = threading.Event()
    model = RecordingModel(gate=gate)
    texts = [f"same three words{i}" for i in range(8)]
    tokens = {t: (10 if i % 2 else 200) for i, t in enumerate(texts)}

    async def body(b):
        futures = [b.submit(t) for t in texts]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*futures)

    async def with_counting_batcher():
        batcher = DynamicBatcher(model, BatcherConfig(max_batch=4, max_wait_s=0.001, max_queue=64),
                                 count_tokens=tokens.__getitem__)
        batcher.start()
        try:
            await body(batcher)
        finally:
            await batcher.close()

    run(with_counting_batcher())
    groups = [set(b) for b in model.batches]
    assert set(texts[1::2]) in groups and set(texts[0::2]) in groups


def test_a_text_the_tokenizer_cannot_count_is_still_scored():
    model = RecordingModel()

    def refuse(text: str) -> int:
        raise ValueError("cannot count")

    async def body():
        batcher = DynamicBatcher(model, BatcherConfig(max_batch=4, max_wait_s=0.001), count_tokens=refuse)
        batcher.start()
        try:
            return await batcher.submit("counted by estimate")
        finally:
            await batcher.close()

    assert run(body()) == ("COUNTED BY ESTIMATE", 19.0)


def test_token_budget_splits_long_texts():
    model = RecordingModel()
    long = [" ".join(["word"] * 300) + str(i) for i in range(4)]  # ~400 tokens each

    async def body(b):
        await asyncio.gather(*(b.submit(t) for t in long))

    run(with_batcher(model, BatcherConfig(max_batch=32, max_tokens=1000, max_wait_s=0.01), body))
    assert all(len(b) <= 2 for b in model.batches) and sum(map(len, model.batches)) == 4


def test_model_error_fails_every_future_of_the_batch():
    async def body(b):
        return await asyncio.gather(*(b.submit(f"t{i}") for i in range(3)), return_exceptions=True)

    results = run(with_batcher(RecordingModel(fail=True), BatcherConfig(max_wait_s=0.01), body))
    assert all(isinstance(r, RuntimeError) for r in results)


def test_wrong_result_count_fails_every_future():
    async def body(b):
        return await asyncio.gather(*(b.submit(f"t{i}") for i in range(3)), return_exceptions=True)

    results = run(with_batcher(RecordingModel(drop_one=True), BatcherConfig(max_wait_s=0.01), body))
    assert all(isinstance(r, RuntimeError) and "2 results for 3 texts" in str(r) for r in results)


def test_cancelled_and_expired_texts_never_reach_the_model():
    gate = threading.Event()
    model = RecordingModel(gate=gate)

    async def body(b):
        blocker = b.submit("first batch")  # occupies the model while the others queue
        await asyncio.sleep(0.02)
        cancelled = b.submit("cancelled")
        expired = b.submit("expired", timeout=0.01)
        kept = b.submit("kept")
        cancelled.cancel()
        await asyncio.sleep(0.05)
        gate.set()
        await blocker
        assert await kept == ("KEPT", 4.0)
        with pytest.raises(DeadlineExpired):
            await expired
        return b.counters

    counters = run(with_batcher(model, BatcherConfig(max_batch=1, max_wait_s=0.001, max_queue=8), body))
    seen = [t for batch in model.batches for t in batch]
    assert "cancelled" not in seen and "expired" not in seen and "kept" in seen
    assert counters["dropped_cancelled"] == 1 and counters["dropped_expired"] == 1


def test_full_queue_rejects_at_once():
    gate = threading.Event()

    async def body(b):
        futures = [b.submit(f"t{i}") for i in range(4)]
        with pytest.raises(QueueFull, match="4 texts waiting"):
            b.submit("one too many")
        gate.set()
        await asyncio.gather(*futures)

    run(with_batcher(RecordingModel(gate=gate), BatcherConfig(max_batch=2, max_queue=4, max_wait_s=0.01), body))


def test_config_names_the_bad_value():
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        BatcherConfig(max_batch=0)


def test_next_batch_is_prepared_while_the_model_runs():
    gate = threading.Event()
    events: list[str] = []

    def prepare(texts):
        events.append(f"prepare {texts[0]}")
        return texts

    def run_batch(texts):
        events.append(f"run {texts[0]}")
        if texts[0] == "first":
            gate.wait(5)
        return [(t, 1.0) for t in texts]

    async def body(b):
        first = b.submit("first")
        await asyncio.sleep(0.05)  # "first" is in the model, blocked
        second = b.submit("second")
        await asyncio.sleep(0.05)
        snapshot = list(events)
        gate.set()
        await asyncio.gather(first, second)
        return snapshot

    async def with_prepare():
        batcher = DynamicBatcher(run_batch, BatcherConfig(max_batch=1, max_wait_s=0.001, max_queue=8), prepare)
        batcher.start()
        try:
            return await body(batcher)
        finally:
            await batcher.close()

    snapshot = run(with_prepare())
    assert snapshot == ["prepare first", "run first", "prepare second"]


@pytest.mark.parametrize("inline", [False, True])
def test_a_text_that_finds_a_lane_free_is_tokenized_by_that_lane(inline):
    """At idle the tokenize thread would be one thread hop more between a text
    and the model (measured: miss-idle p50 0.3-0.5 ms lower without it); it
    only prepares the next batch while every lane is busy, or (prepare_inline:
    the texts were encoded when counted) the event loop pads it itself."""
    gate = threading.Event()
    prepared_in: dict[str, str] = {}

    def prepare(texts):
        prepared_in[texts[0]] = threading.current_thread().name
        return texts

    def run_batch(texts):
        if texts[0] == "first":
            gate.wait(5)
        return [(t, 1.0) for t in texts]

    async def body():
        batcher = DynamicBatcher(run_batch, BatcherConfig(max_batch=1, max_wait_s=0.001, max_queue=8), prepare,
                                 prepare_inline=inline)
        batcher.start()
        try:
            first = batcher.submit("first")
            await asyncio.sleep(0.05)  # "first" holds the only lane
            second = batcher.submit("second")
            await asyncio.sleep(0.05)
            gate.set()
            assert await asyncio.gather(first, second) == [("first", 1.0), ("second", 1.0)]
        finally:
            await batcher.close()
        return batcher.metrics.cpu_s, threading.current_thread().name

    cpu, loop_thread = run(body())
    assert prepared_in["first"].startswith("model")
    assert prepared_in["second"] == loop_thread if inline else prepared_in["second"].startswith("tokenize")
    assert cpu["tokenize"] > 0 and cpu["forward"] > 0  # both still counted where they ran


def test_queue_is_bounded_by_the_wait_it_implies():
    def slow(texts):
        threading.Event().wait(0.05 * len(texts))  # 20 texts/s
        return [(t, 1.0) for t in texts]

    async def body(b):
        await b.submit("measure the speed")
        admitted = []
        with pytest.raises(QueueFull, match="s of model work"):
            for i in range(100):
                admitted.append(b.submit(f"t{i}"))
        assert 5 <= len(admitted) <= 15  # about max_queue_wait_s (0.5 s) x 20 texts/s
        await asyncio.gather(*admitted)

    run(with_batcher(slow, BatcherConfig(max_batch=4, max_wait_s=0.001, max_queue=1000, max_queue_wait_s=0.5), body))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_speed_of_sub_millisecond_passes_is_measured_on_either_loop(loop):
    # The queue's bound in model time rests on the measured speed. uvloop's
    # loop.time() counts whole milliseconds: timed with it, a 0.5 ms pass
    # took 0 (or 1) ms, the speed came out ~1e6 texts/s, and a queue of any
    # length "held" no model time.
    gate = threading.Event()
    gate.set()

    def fast(texts):
        gate.wait(5)
        threading.Event().wait(0.0005 * len(texts))
        return [(t, 1.0) for t in texts]

    async def body(b):
        for i in range(20):
            await b.submit(f"warm {i}")  # one text a pass: the speed is measured 20 times
        gate.clear()  # the model stalls; what is queued now waits
        first = b.submit("stalled")
        await asyncio.sleep(0.05)
        queued = [b.submit(f"t{i}") for i in range(100)]
        waited = b.expected_wait_s()
        gate.set()
        await asyncio.gather(first, *queued)
        return waited

    factory = pytest.importorskip("uvloop").new_event_loop if loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        waited = runner.run(with_batcher(fast, BatcherConfig(max_batch=1, max_wait_s=0.001, max_queue=1000), body))
    # 100 queued texts at one ~0.5 ms pass each (0.5 ms asked; sleeps overshoot): about 0.05-0.2 s.
    assert 0.02 < waited < 0.5, waited


def test_sparse_arrivals_do_not_wait_for_company():
    async def body(b):
        loop = asyncio.get_running_loop()
        took = []
        for i in range(6):  # one text at a time, far apart: the window never fills
            start = loop.time()
            await b.submit(f"alone {i}")
            took.append(loop.time() - start)
            await asyncio.sleep(0.3)
        return took

    took = run(with_batcher(RecordingModel(), BatcherConfig(max_wait_s=0.25), body))
    assert took[0] >= 0.2  # no history yet: the first waits for company
    assert max(took[-3:]) < 0.1  # once arrivals are known to be sparse, it goes at once


class ConcurrencyProbe:
    """A model that records how many of its calls overlap."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.running = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, texts):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        threading.Event().wait(self.seconds)
        with self.lock:
            self.running -= 1
        return [(t, 1.0) for t in texts]


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_lanes_bound_how_many_batches_run_at_once(lanes):
    probe = ConcurrencyProbe(0.05)

    async def body():
        batcher = DynamicBatcher(probe, BatcherConfig(max_batch=2, max_wait_s=0.001), lanes=lanes)
        batcher.start()
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            results = await asyncio.gather(*(batcher.submit(f"t{i}") for i in range(12)))  # 6 batches
            return results, loop.time() - start
        finally:
            await batcher.close()

    results, took = run(body())
    assert results == [(f"t{i}", 1.0) for i in range(12)]
    assert probe.most == lanes  # as many at once as there are lanes, never more
    assert took >= 0.05 * (6 // lanes) * 0.9  # the batches really queued behind the busy lanes


def test_default_batch_size_depends_on_the_device():
    assert BatcherConfig().max_batch is None
    assert BatcherConfig().for_device("cpu").max_batch == 4
    assert BatcherConfig().for_device("cuda:0").max_batch == 64
    assert BatcherConfig(max_batch=7).for_device("cuda").max_batch == 7
    assert BatcherConfig(max_queue=16).for_device("cuda").max_batch == 16  # never more than the queue holds


def test_the_batch_size_never_exceeds_what_keeps_the_models_answers_batch_free():
    from inference.model import ModelInfo

    def info(dtype, limit, device="cpu"):
        return ModelInfo("m", ("a", "b"), "f", device, dtype, max_batch_texts=limit)

    assert BatcherConfig().for_model(info("float32", None)).max_batch == 4
    assert BatcherConfig(max_batch=16).for_model(info("float32", None, "cuda")).max_batch == 16
    assert BatcherConfig().for_model(info("int8-dynamic", 1)).max_batch == 1
    assert BatcherConfig(max_batch=1).for_model(info("int8-dynamic", 1)).max_batch == 1
    with pytest.raises(ValueError, match="--max-batch-texts 8: the int8-dynamic model scores at most 1 text"):
        BatcherConfig(max_batch=8).for_model(info("int8-dynamic", 1))
