"""Dynamic batching: many callers' texts become few model calls.

A batch closes `max_wait_s` after its first item arrived (later while every
model lane is busy, so it can grow meanwhile), or as soon as `max_batch` items
wait. Waiting texts are grouped by length (their tokens, counted by the
model's tokenizer when submitted) so that short texts are not padded to the
length of a long one, and a token budget bounds the padded size of a batch.
Preparing a batch (tokenizing) runs in one thread and the model in others,
all off the event loop, so the next batch is tokenized while the model
runs the current ones; a batch that finds a lane free is tokenized by that
lane (at idle the tokenize thread would only add a thread hop).

`lanes` model calls may run at once, each in a thread of its own. On a CPU,
several single-threaded forward passes side by side keep the cores busier than
one pass split over all of them (measured with the default model on 2 cores:
2 lanes of 1 thread 357 texts/s, 1 lane of 2 threads 274).

The queue is bounded twice: by length (max_queue) and by the wait it implies
at the measured model speed (max_queue_wait_s), so an overloaded service says
RESOURCE_EXHAUSTED at once instead of building a minute-long queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from protos.errors import DeadlineExceeded, Overloaded
from protos.metrics import Histogram, sample_key

if TYPE_CHECKING:
    from inference.model import ModelInfo

__all__ = ["BatcherConfig", "DynamicBatcher", "default_max_batch", "QueueFull", "DeadlineExpired", "estimate_tokens"]

log = logging.getLogger(__name__)

# The shortest timer the batching window sets: uvloop wakes up again and
# again for one under a millisecond (measured: 22 turns for 0.4 ms), and
# asyncio's own loop oversleeps such a timer by about a millisecond anyway.
_MIN_TIMER_S = 0.001

ScoreBatch = Callable[[Any], list[tuple[str, float]]]
PrepareBatch = Callable[[list[str]], Any]
CountTokens = Callable[[str], int]


class QueueFull(Overloaded):
    """The batcher holds max_queue texts already; the caller should back off."""


class DeadlineExpired(DeadlineExceeded):
    """The text's deadline passed before it reached the model; it was not scored."""


def estimate_tokens(text: str) -> int:
    """A cheap token-count estimate, for a model without a tokenizer to count
    with (WordPiece gives ~1.3 tokens a word). The real count groups far
    better: on the bench's ~60-token tweets, batches of 4 grouped by this
    estimate from 24 waiting texts were padded to 1.28x their tokens, by the
    real count to 1.05x (arrival order: 1.34x)."""
    return 2 + (len(text.split()) * 4 + 2) // 3


@dataclass(frozen=True)
class BatcherConfig:
    # Texts per model call. None: default_max_batch(device). On a CPU a pass
    # costs about its padded tokens, so small batches (less padding) win.
    max_batch: int | None = None
    max_tokens: int = 8192     # padded tokens per model call (batch size x longest text)
    max_wait_s: float = 0.005  # how long the first text of a batch waits for company
    max_queue: int = 2048      # texts waiting; beyond this submit() fails with QueueFull
    # Or when the queue already holds this much model time. Under 2x overload
    # on 2 cores, 1 s (vs 2 s) served more (149 vs 115 texts/s), at p99 1.8 s
    # (vs 3.7 s), and kept refusals faster (max 29 vs 57 ms): fewer calls in
    # flight leave less for the gateway's garbage collector to walk.
    max_queue_wait_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens must be >= 16, got {self.max_tokens}")
        if not 0 <= self.max_wait_s <= 1:
            raise ValueError(f"max_wait_s must be in 0..1 s, got {self.max_wait_s}")
        if self.max_queue < (self.max_batch or 1):
            raise ValueError(f"max_queue ({self.max_queue}) must be >= max_batch ({self.max_batch})")
        if self.max_queue_wait_s <= 0:
            raise ValueError(f"max_queue_wait_s must be > 0, got {self.max_queue_wait_s}")

    def for_device(self, device: str) -> BatcherConfig:
        """This config with max_batch decided, for a model on `device`."""
        if self.max_batch is not None:
            return self
        return dataclasses.replace(self, max_batch=min(default_max_batch(device), self.max_queue))

    def for_model(self, info: ModelInfo) -> BatcherConfig:
        """This config with max_batch decided for the loaded model: never more
        texts per pass than keep each text's answer a function of the text
        alone (ModelInfo.max_batch_texts); asking for more is an error, not a
        silent change of answers."""
        limit = info.max_batch_texts
        if limit is not None and self.max_batch is not None and self.max_batch > limit:
            way_out = ", or serve float32 (--quantize off) to batch" if info.dtype.startswith("int8") else ""
            raise ValueError(
                f"--max-batch-texts {self.max_batch}: the {info.dtype} model scores at most {limit} text(s) per pass, "
                f"or a text's answer would depend on the texts beside it; leave --max-batch-texts unset{way_out}"
            )
        config = self.for_device(info.device)
        if limit is not None and config.max_batch > limit:
            config = dataclasses.replace(config, max_batch=limit)
        return config


def default_max_batch(device: str) -> int:
    # Measured on 2 cores (AVX2), default model, float32, 2 lanes of 1 thread,
    # ~60-token texts grouped by length: 4: 101, 8: 98, 1: 83 texts/s. (int8
    # models take 1: ModelInfo.max_batch_texts and BatcherConfig.for_model.)
    # On a GPU a bigger batch costs little more than a small one (not
    # measured here: no GPU was lent to this project's sessions).
    return 4 if device == "cpu" else 64


_UNPREPARED = object()  # a batch its lane tokenizes itself (see _run)


@dataclass(slots=True)
class _Waiting:
    text: str
    cost: int
    future: asyncio.Future
    deadline: float | None  # time.monotonic() after which the text is not worth scoring
    arrived: float


class BatchMetrics:
    """Histograms of the batches the model ran (protos.metrics; read at scrape time)."""

    def __init__(self) -> None:
        self.queue_wait_s = Histogram()  # from submit() to the start of the text's forward pass
        self.forward_s = Histogram()
        self.batch_texts = Histogram(_BATCH_TEXTS_BOUNDS)
        self.batch_tokens = Histogram(_BATCH_TOKENS_BOUNDS)  # padded: texts x the longest text's tokens
        # CPU seconds of the threads that tokenize and run the model (with one
        # runtime thread per lane the model computes in the lane's own thread):
        # the rest of the process's CPU is the event loop's (gRPC, batching,
        # delivery). `tiergate bench` splits a miss's cost with them.
        self.cpu_s = {"tokenize": 0.0, "forward": 0.0}
        self._cpu_lock = threading.Lock()  # lanes add from threads of their own

    def timed(self, stage: str, fn, arg):
        """fn(arg) in the calling thread, its CPU time added to cpu_s[stage]."""
        started = time.thread_time()
        try:
            return fn(arg)
        finally:
            took = time.thread_time() - started
            with self._cpu_lock:
                self.cpu_s[stage] += took

    def batch_done(self, batch: list[_Waiting], started: float, took: float) -> None:
        for w in batch:
            self.queue_wait_s.observe(started - w.arrived)
        self.forward_s.observe(took)
        self.batch_texts.observe(len(batch))
        self.batch_tokens.observe(len(batch) * max(w.cost for w in batch))

    def samples(self) -> dict[str, float]:
        return {
            **self.queue_wait_s.samples("tiergate_inference_queue_wait_seconds"),
            **self.forward_s.samples("tiergate_inference_forward_seconds"),
            **self.batch_texts.samples("tiergate_inference_batch_texts"),
            **self.batch_tokens.samples("tiergate_inference_batch_tokens"),
            **{sample_key("tiergate_inference_cpu_seconds_total", stage=stage): s for stage, s in self.cpu_s.items()},
        }


_BATCH_TEXTS_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_BATCH_TOKENS_BOUNDS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class DynamicBatcher:
    """`run_batch(prepared)` scores one batch, from up to `lanes` threads at
    once; `prepare_batch(texts)`, if given, turns texts into its input (e.g.
    tokenizes) in a thread of its own, or in the lane's thread when a lane is
    free: it too may run in several threads at once (both runtimes' tokenizers
    are used with fixed settings, which is safe). With `prepare_inline` (a
    prepare_batch that is cheap once count_tokens ran), batches prepared while
    every lane is busy are prepared on the event loop instead."""

    def __init__(self, run_batch: ScoreBatch, config: BatcherConfig = BatcherConfig(),
                 prepare_batch: PrepareBatch | None = None, *, lanes: int = 1,
                 count_tokens: CountTokens | None = None, prepare_inline: bool = False) -> None:
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        if config.max_batch is None:
            config = config.for_device("cpu")
        self._run_batch = run_batch
        self._prepare_batch = prepare_batch
        self._count_tokens = count_tokens  # a text's tokens as the model counts them (else estimate_tokens)
        self._prepare_inline = prepare_inline
        self.config = config
        self.lanes = lanes
        self._queue: list[_Waiting] = []
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(lanes, thread_name_prefix="model")
        self._prepare_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._task: asyncio.Task | None = None
        self._forwards: set[asyncio.Task] = set()  # batches in the model now, at most `lanes`
        self._texts_per_s = 0.0  # measured speed of one lane (EWMA); 0 until the first batch
        self._gap_s = 0.0  # time between arrivals (EWMA); 0 at start: assume company comes
        self._last_arrival: float | None = None
        self.counters: Counter[str] = Counter()
        self.metrics = BatchMetrics()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def _lanes_busy(self) -> bool:
        return len(self._forwards) >= self.lanes

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def close(self) -> None:
        for task in (self._task, *self._forwards):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(asyncio.CancelledError("inference service shutting down"))
        self._queue.clear()
        self._executor.shutdown(wait=True)
        self._prepare_executor.shutdown(wait=True)

    def expected_wait_s(self) -> float:
        """Model time the queue holds now, at the measured speed (0 before any batch ran)."""
        return len(self._queue) / (self._texts_per_s * self.lanes) if self._texts_per_s else 0.0

    def submit(self, text: str, timeout: float | None = None) -> asyncio.Future:
        """Queues one text; the future resolves to (label, score)."""
        loop = asyncio.get_running_loop()
        if len(self._queue) >= self.config.max_queue:
            self.counters["rejected_full"] += 1
            raise QueueFull(f"inference queue is full ({self.config.max_queue} texts waiting)")
        if self.expected_wait_s() > self.config.max_queue_wait_s:
            self.counters["rejected_wait"] += 1
            raise QueueFull(
                f"inference queue holds {self.expected_wait_s():.1f} s of model work "
                f"(limit {self.config.max_queue_wait_s:g} s)"
            )
        now = time.monotonic()  # not loop.time(): uvloop's counts whole milliseconds
        if self._last_arrival is not None:
            self._gap_s = 0.7 * self._gap_s + 0.3 * min(now - self._last_arrival, 10.0)
        self._last_arrival = now
        future = loop.create_future()
        deadline = now + timeout if timeout else None
        self._queue.append(_Waiting(text, self._cost(text), future, deadline, now))
        self._wakeup.set()
        if len(self._queue) >= self.config.max_batch:
            self._full.set()
        return future

    def _cost(self, text: str) -> int:
        if self._count_tokens is not None:
            try:
                # Counted as tokenizing: with onnxruntime this is the text's encoding.
                return self.metrics.timed("tokenize", self._count_tokens, text)
            except Exception as exc:  # grouping is an optimisation: never refuse a text for it
                log.debug("counting tokens failed, estimating: %r", exc)
        return estimate_tokens(text)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._queue) < cfg.max_batch:
                self._full.clear()
                delay = self._queue[0].arrived + cfg.max_wait_s - time.monotonic()
                if not self._lanes_busy() and self._gap_s > cfg.max_wait_s:
                    delay = 0  # texts arrive further apart than the window: waiting only adds latency
                if delay > 0:  # the first text waits a little for company
                    try:
                        await asyncio.wait_for(self._full.wait(), max(delay, _MIN_TIMER_S))
                    except TimeoutError:
                        pass
                    continue
                if self._lanes_busy():
                    # The model is busy anyway: let the batch grow until a lane is free.
                    full = asyncio.ensure_future(self._full.wait())
                    await asyncio.wait({full, *self._forwards}, return_when=asyncio.FIRST_COMPLETED)
                    full.cancel()
                    continue
            batch = self._take_batch(time.monotonic())
            if not batch:
                continue
            if not self._lanes_busy():
                # A lane is free: it tokenizes the batch itself. The tokenize
                # thread only pays off while every lane is busy (the next batch
                # is ready when one frees up); at idle it is one thread hop
                # more between a text and the model.
                self._start_forward(loop, batch, _UNPREPARED)
                continue
            prepared = await self._prepare(loop, batch)
            if prepared is None:
                continue
            if self._lanes_busy():
                # At most `lanes` batches in the model at a time; _score never raises.
                await asyncio.wait(self._forwards, return_when=asyncio.FIRST_COMPLETED)
                # Texts may have expired or been cancelled while the model was busy.
                live = [w for w in batch if not self._drop_if_dead(w, time.monotonic())]
                if len(live) < len(batch):
                    batch = live
                    prepared = await self._prepare(loop, batch) if batch else None
                    if prepared is None:
                        continue
            self._start_forward(loop, batch, prepared)

    def _start_forward(self, loop: asyncio.AbstractEventLoop, batch: list[_Waiting], prepared) -> None:
        forward = loop.create_task(self._score(loop, batch, prepared))
        self._forwards.add(forward)
        forward.add_done_callback(self._forwards.discard)

    async def _prepare(self, loop: asyncio.AbstractEventLoop, batch: list[_Waiting]):
        texts = [w.text for w in batch]
        if self._prepare_batch is None:
            return texts
        try:
            if self._prepare_inline:
                # Counting already encoded the texts: what is left (padding a
                # few arrays, tens of microseconds) costs less than the two
                # thread wake-ups of a trip to the tokenize thread.
                return self.metrics.timed("tokenize", self._prepare_batch, texts)
            return await loop.run_in_executor(self._prepare_executor, self.metrics.timed, "tokenize",
                                              self._prepare_batch, texts)
        except Exception as exc:
            self._fail(batch, exc, "preparing")
            return None

    def _prepare_and_run(self, texts: list[str]) -> tuple[list, float]:
        """In a lane's thread: tokenize (when the model needs it), then the
        forward pass; (results, seconds spent tokenizing)."""
        started = time.perf_counter()
        prepared = texts if self._prepare_batch is None else self.metrics.timed("tokenize", self._prepare_batch, texts)
        tokenizing = time.perf_counter() - started
        return self.metrics.timed("forward", self._run_batch, prepared), tokenizing

    def _fail(self, batch: list[_Waiting], exc: BaseException, stage: str) -> None:
        # Fail every open future: no caller may hang.
        log.error("%s a batch of %d texts failed: %r", stage, len(batch), exc)
        self.counters["batch_errors"] += 1
        for w in batch:
            if not w.future.done():
                w.future.set_exception(exc)

    async def _score(self, loop: asyncio.AbstractEventLoop, batch: list[_Waiting], prepared) -> None:
        started = time.monotonic()
        try:
            if prepared is _UNPREPARED:
                results, tokenizing = await loop.run_in_executor(self._executor, self._prepare_and_run,
                                                                 [w.text for w in batch])
                started += tokenizing  # the forward pass's own duration, as when the tokenize thread prepared it
            else:
                results = await loop.run_in_executor(self._executor, self.metrics.timed, "forward", self._run_batch,
                                                     prepared)
            if len(results) != len(batch):
                raise RuntimeError(f"model returned {len(results)} results for {len(batch)} texts")
        except Exception as exc:
            self._fail(batch, exc, "tokenizing or scoring" if prepared is _UNPREPARED else "scoring")
            return
        took = max(time.monotonic() - started, 1e-6)
        self.metrics.batch_done(batch, started, took)
        rate = len(batch) / took
        self._texts_per_s = rate if not self._texts_per_s else 0.8 * self._texts_per_s + 0.2 * rate
        self.counters["batches"] += 1
        self.counters["texts_scored"] += len(batch)
        for w, result in zip(batch, results):
            if not w.future.done():
                w.future.set_result(result)

    def _drop_if_dead(self, w: _Waiting, now: float) -> bool:
        """True (and counted) if nobody waits for this text any more or its deadline passed."""
        if w.future.done():  # the caller went away
            self.counters["dropped_cancelled"] += 1
            return True
        if w.deadline is not None and w.deadline <= now:
            self.counters["dropped_expired"] += 1
            w.future.set_exception(DeadlineExpired("deadline passed before the text reached the model"))
            return True
        return False

    def _take_batch(self, now: float) -> list[_Waiting]:
        """Removes and returns the next batch: the oldest text plus its nearest neighbours in length."""
        cfg = self.config
        if cfg.max_batch == 1:  # nothing to group: the oldest live text, without walking the queue
            while self._queue:
                w = self._queue.pop(0)
                if not self._drop_if_dead(w, now):
                    if self._queue:
                        self._full.set()
                    return [w]
            return []
        live = [w for w in self._queue if not self._drop_if_dead(w, now)]
        if not live:
            self._queue = []
            return []
        oldest = live[0]  # the queue is in arrival order: serve the oldest first, for fairness
        by_cost = sorted(live, key=lambda w: w.cost)
        lo = hi = by_cost.index(oldest)
        # Grow a window of similar lengths around the oldest text while it fits the budget.
        while hi - lo + 1 < cfg.max_batch:
            left = by_cost[lo - 1] if lo > 0 else None
            right = by_cost[hi + 1] if hi + 1 < len(by_cost) else None
            if left is None and right is None:
                break
            take_right = left is None or (right is not None and right.cost - oldest.cost <= oldest.cost - left.cost)
            longest = by_cost[hi + 1].cost if take_right else by_cost[hi].cost
            if (hi - lo + 2) * longest > cfg.max_tokens:
                break
            if take_right:
                hi += 1
            else:
                lo -= 1
        batch = by_cost[lo : hi + 1]
        chosen = {id(w) for w in batch}
        self._queue = [w for w in live if id(w) not in chosen]
        if self._queue and len(self._queue) >= cfg.max_batch:
            self._full.set()
        return batch
