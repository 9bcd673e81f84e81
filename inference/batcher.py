"""Dynamic batching: many callers' texts become few model calls.

A batch closes `max_wait_s` after its first item arrived, or as soon as
`max_batch` items wait. Waiting texts are grouped by length so that short
texts are not padded to the length of a long one, and a token budget bounds
the padded size of a batch. The model runs in one worker thread, off the event
loop; torch uses its own threads inside that call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable

__all__ = ["BatcherConfig", "DynamicBatcher", "QueueFull", "DeadlineExpired", "estimate_tokens"]

log = logging.getLogger(__name__)

ScoreBatch = Callable[[list[str]], list[tuple[str, float]]]


class QueueFull(Exception):
    """The batcher holds max_queue texts already; the caller should back off."""


class DeadlineExpired(Exception):
    """The text's deadline passed before it reached the model; it was not scored."""


def estimate_tokens(text: str) -> int:
    """A cheap token-count estimate for grouping (WordPiece gives ~1.3 tokens a word)."""
    return 2 + (len(text.split()) * 4 + 2) // 3


@dataclass(frozen=True)
class BatcherConfig:
    max_batch: int = 32        # texts per model call
    max_tokens: int = 8192     # padded tokens per model call (batch size x longest text)
    max_wait_s: float = 0.005  # how long the first text of a batch waits for company
    max_queue: int = 2048      # texts waiting; beyond this submit() fails with QueueFull

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens must be >= 16, got {self.max_tokens}")
        if not 0 <= self.max_wait_s <= 1:
            raise ValueError(f"max_wait_s must be in 0..1 s, got {self.max_wait_s}")
        if self.max_queue < self.max_batch:
            raise ValueError(f"max_queue ({self.max_queue}) must be >= max_batch ({self.max_batch})")


@dataclass(slots=True)
class _Waiting:
    text: str
    cost: int
    future: asyncio.Future
    deadline: float | None  # loop.time() after which the text is not worth scoring
    arrived: float


class DynamicBatcher:
    def __init__(self, score_batch: ScoreBatch, config: BatcherConfig = BatcherConfig()) -> None:
        self._score_batch = score_batch
        self.config = config
        self._queue: list[_Waiting] = []
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self._task: asyncio.Task | None = None
        self.counters: Counter[str] = Counter()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(asyncio.CancelledError("inference service shutting down"))
        self._queue.clear()
        self._executor.shutdown(wait=True)

    def submit(self, text: str, timeout: float | None = None) -> asyncio.Future:
        """Queues one text; the future resolves to (label, score)."""
        loop = asyncio.get_running_loop()
        if len(self._queue) >= self.config.max_queue:
            self.counters["rejected_full"] += 1
            raise QueueFull(f"inference queue is full ({self.config.max_queue} texts waiting)")
        now = loop.time()
        future = loop.create_future()
        deadline = now + timeout if timeout else None
        self._queue.append(_Waiting(text, estimate_tokens(text), future, deadline, now))
        self._wakeup.set()
        if len(self._queue) >= self.config.max_batch:
            self._full.set()
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            delay = self._queue[0].arrived + self.config.max_wait_s - loop.time()
            if delay > 0 and len(self._queue) < self.config.max_batch:
                self._full.clear()
                try:
                    await asyncio.wait_for(self._full.wait(), delay)
                except TimeoutError:
                    pass
            batch = self._take_batch(loop.time())
            if batch:
                await self._score(loop, batch)

    async def _score(self, loop: asyncio.AbstractEventLoop, batch: list[_Waiting]) -> None:
        try:
            results = await loop.run_in_executor(self._executor, self._score_batch, [w.text for w in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"model returned {len(results)} results for {len(batch)} texts")
        except Exception as exc:  # fail every open future: no caller may hang
            log.exception("model call failed for a batch of %d texts", len(batch))
            self.counters["batch_errors"] += 1
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(exc)
            return
        self.counters["batches"] += 1
        self.counters["texts_scored"] += len(batch)
        for w, result in zip(batch, results):
            if not w.future.done():
                w.future.set_result(result)

    def _take_batch(self, now: float) -> list[_Waiting]:
        """Removes and returns the next batch: the oldest text plus its nearest neighbours in length."""
        live: list[_Waiting] = []
        for w in self._queue:
            if w.future.done():  # the caller went away
                self.counters["dropped_cancelled"] += 1
            elif w.deadline is not None and w.deadline <= now:
                self.counters["dropped_expired"] += 1
                w.future.set_exception(DeadlineExpired("deadline passed before the text reached the model"))
            else:
                live.append(w)
        if not live:
            self._queue = []
            return []
        oldest = live[0]  # the queue is in arrival order: serve the oldest first, for fairness
        by_cost = sorted(live, key=lambda w: w.cost)
        lo = hi = by_cost.index(oldest)
        cfg = self.config
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
