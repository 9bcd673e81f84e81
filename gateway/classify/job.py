"""The loop of `tiergate classify`: rows in, ClassifyBatch calls out, answers back in input order.

Rows are read only as far ahead as the window of texts in flight (plus a
bounded margin for answers waiting on an earlier row), and each answer is
written as soon as every row before it is written, so memory stays bounded
whatever the file's length. A refused or failed call is retried (see flow.py)
until --max-retry-s passes without an answer to it; a text the gateway
rejects for itself (INVALID_ARGUMENT) gets an error value and the job goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import grpc

from gateway.classify.flow import RETRY_CODES, SLOW_DOWN_CODES, AdaptiveWindow, Backoff
from gateway.classify.output import OutputFile
from gateway.classify.feed import RowFeed
from gateway.classify.rows import Result, Row
from protos import classifier_pb2, classifier_pb2_grpc

__all__ = ["JobOptions", "JobStopped", "Tally", "ClassifyJob", "TIERS"]

log = logging.getLogger(__name__)

TIERS = ("MODEL", "L1", "L2", "L3")
_TIER_NAMES = {v.number: v.name.removeprefix("TIER_") for v in classifier_pb2.Tier.DESCRIPTOR.values}
_READ_AHEAD_WINDOWS = 4  # rows read beyond the oldest unwritten one: this many full windows
_TOO_LARGE = "larger than max"  # gRPC's words for a message over the receiver's limit


def _why(code: grpc.StatusCode, details: str | None, target: str, options: JobOptions) -> str:
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"calls to the gateway at {target} kept exceeding their deadline (--call-timeout-s " \
               f"{options.call_timeout_s:g})"
    return f"the gateway at {target} answered {code.name} ({details})"


@dataclass(frozen=True)
class JobOptions:
    batch_size: int = 64          # texts per ClassifyBatch call (fewer while the window is smaller)
    max_calls: int = 16           # the window's ceiling, in calls
    max_retry_s: float = 300.0    # a call unanswered for this long (retries included) stops the job
    call_timeout_s: float = 60.0  # one call's deadline; past it the call is retried
    backoff: Backoff = field(default_factory=Backoff)


class JobStopped(RuntimeError):
    """The job cannot go on (the message says why); what is done is kept for --resume."""


@dataclass
class Tally:
    tiers: Counter = field(default_factory=Counter)  # answers by tier name
    errors: int = 0
    retries: int = 0
    refusals: int = 0

    @property
    def rows(self) -> int:
        return sum(self.tiers.values()) + self.errors

    def add(self, result: Result) -> None:
        if result.error:
            self.errors += 1
        else:
            self.tiers[result.tier] += 1

    def shares(self) -> str:
        rows = self.rows or 1
        parts = [f"{t} {100 * self.tiers[t] / rows:.0f}%" for t in TIERS]
        return " ".join(parts) + f" err {self.errors}"


def _result(response) -> Result:
    if response.HasField("error"):
        return Result(error=response.error.message or f"status {response.error.code}")
    return Result(response.label, response.score, _TIER_NAMES.get(response.tier, str(response.tier)), response.model)


class ClassifyJob:
    """One pass over rows: call run(), then read `tally`. stop() ends it early, cleanly."""

    def __init__(self, channel: grpc.aio.Channel, target: str, output: OutputFile, render: Callable,
                 options: JobOptions, on_written: Callable[[int], None] = lambda rows: None,
                 metadata: tuple[tuple[str, str], ...] | None = None) -> None:
        self._stub = classifier_pb2_grpc.ClassifierStub(channel)
        self._metadata = metadata        # sent on every call (a bearer token), or None
        self._target = target
        self._output = output
        self._render = render            # [(Row, Result)] -> bytes
        self._options = options
        self._on_written = on_written    # rows just written (the progress bar)
        self.window = AdaptiveWindow(options.batch_size, max_calls=options.max_calls)
        self.tally = Tally()
        self._done: dict[int, tuple[Row, Result]] = {}
        self._next_write = 0
        self._next_read = 0
        self._in_flight = 0
        self._changed = asyncio.Event()  # a call ended: there may be room for the next
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self._told_retrying = False
        self._feed_buffer = 2 * options.batch_size
        self.failure: BaseException | None = None

    def stop(self) -> None:
        """Send nothing more; calls in flight may still finish (run() waits for them)."""
        self._stopping = True
        self._changed.set()

    def cancel_in_flight(self) -> None:
        for task in self._tasks:
            task.cancel()

    @property
    def _taken_limit(self) -> int:
        """Rows taken from the feed beyond the oldest unwritten one, at most."""
        return int(self.window.max_texts) * _READ_AHEAD_WINDOWS

    @property
    def read_ahead_limit(self) -> int:
        """Rows read from the input beyond the oldest unwritten one, at most:
        those taken, the feed's buffer, and the one its thread holds."""
        return self._taken_limit + self._feed_buffer + 1

    def _interrupted(self) -> bool:
        return self._stopping or self.failure is not None

    async def run(self, rows: Iterator[Row], *, grace_s: float = 10.0) -> bool:
        """True once every row is written; False if stopped first, by stop()
        (calls in flight get grace_s to bring their answers) or by a failure.
        An error reading the input is raised."""
        feed = RowFeed(rows, buffer=self._feed_buffer)
        try:
            exhausted = await self._dispatch(feed)
            while self._tasks and not self._stopping and self.failure is None:
                self._changed.clear()
                await self._changed.wait()
            if self._tasks:
                timeout = grace_s if self.failure is None else 0
                await asyncio.wait(set(self._tasks), timeout=timeout)
        finally:
            pending = list(self._tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            feed.close()
        return exhausted and self.failure is None and self._next_write == self._next_read

    async def _dispatch(self, feed: RowFeed) -> bool:
        """Send every row; True once the input is exhausted, False if stopped first."""
        window = self.window
        while True:
            size = window.call_size()
            while not self._room_for(size):
                self._changed.clear()
                await self._changed.wait()
                size = window.call_size()
            if self._stopping or self.failure is not None:
                return False
            room = min(size, self._taken_limit - (self._next_read - self._next_write))
            rows, exhausted = await feed.take(room, self._changed, self._interrupted)
            if self._stopping or self.failure is not None:
                return False
            chunk: list[tuple[int, Row]] = []
            for row in rows:
                seq, self._next_read = self._next_read, self._next_read + 1
                if row.text is None:
                    self._deliver(seq, row, Result(error=row.problem or "no text"))
                elif not row.text.strip():
                    self._deliver(seq, row, Result(error="the text is empty or only whitespace"))
                else:
                    chunk.append((seq, row))
            if chunk:
                self._in_flight += len(chunk)
                task = asyncio.ensure_future(self._call(chunk))
                self._tasks.add(task)
                task.add_done_callback(self._call_ended)
            if exhausted:
                return True

    def _room_for(self, size: int) -> bool:
        if self._interrupted():
            return True  # to leave the loop
        return (self.window.may_send(self._in_flight, size)
                and self._next_read - self._next_write < self._taken_limit)

    def _call_ended(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            self.failure = task.exception()
        self._changed.set()

    def _deliver(self, seq: int, row: Row, result: Result) -> None:
        self._done[seq] = (row, result)
        self.tally.add(result)
        if seq == self._next_write:
            pairs = []
            while self._next_write in self._done:
                pairs.append(self._done.pop(self._next_write))
                self._next_write += 1
            self._output.write(self._render(pairs), len(pairs), sum(1 for _, r in pairs if r.error))
            self._on_written(len(pairs))

    async def _send(self, piece: list[tuple[int, Row]]) -> list:
        timeout = self._options.call_timeout_s
        if len(piece) == 1:  # Classify: a rejection then names "text", not "texts[0]"
            return [await self._stub.Classify(classifier_pb2.ClassifyRequest(text=piece[0][1].text), timeout=timeout,
                                              metadata=self._metadata)]
        request = classifier_pb2.ClassifyBatchRequest(texts=[row.text for _, row in piece])
        return list((await self._stub.ClassifyBatch(request, timeout=timeout, metadata=self._metadata)).results)

    async def _call(self, chunk: list[tuple[int, Row]]) -> None:
        options, window = self._options, self.window
        pieces = [chunk]
        attempt = 0
        first_failure: float | None = None
        while pieces:
            piece = pieces.pop(0)
            epoch = window.epoch
            try:
                results = await self._send(piece)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if self._stopping:
                    return  # stopped: these rows stay unwritten, for --resume
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE in (exc.details() or ""):
                    # Not backpressure: the message is over the gateway's size limit.
                    if len(piece) > 1:
                        half = len(piece) // 2
                        pieces[:0] = [piece[:half], piece[half:]]
                    else:
                        self._in_flight -= 1
                        seq, row = piece[0]
                        self._deliver(seq, row, Result(error="the text is larger than the gateway accepts in one "
                                                       f"message ({exc.details()})"))
                    continue
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    if len(piece) > 1:  # one text spoils the call: find it by sending each alone
                        pieces[:0] = [[one] for one in piece]
                    else:
                        self._in_flight -= 1
                        seq, row = piece[0]
                        self._deliver(seq, row, Result(error=exc.details() or "rejected by the gateway"))
                    continue
                if code not in RETRY_CODES:
                    raise JobStopped(f"the gateway at {self._target} answered {code.name}: {exc.details()}") from None
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure >= options.max_retry_s:
                    raise JobStopped(f"{_why(code, exc.details(), self._target, options)} for "
                                     f"{now - first_failure:.1f} s (--max-retry-s {options.max_retry_s:g})") from None
                if not self._told_retrying and code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    # (backpressure is what a batch job meets all the time: no news)
                    self._told_retrying = True
                    log.warning("%s; retrying with backoff for up to %g s (--max-retry-s)",
                                _why(code, exc.details(), self._target, options), options.max_retry_s)
                if code in SLOW_DOWN_CODES:
                    self.tally.refusals += 1
                    window.on_slow_down(epoch)
                self.tally.retries += 1
                attempt += 1
                size = window.call_size()
                pieces[:0] = [piece[i:i + size] for i in range(0, len(piece), size)]
                await asyncio.sleep(options.backoff.pause_s(attempt))
                if self._stopping:
                    return
                continue
            if len(results) != len(piece):
                raise JobStopped(f"the gateway at {self._target} answered {len(results)} results "
                                 f"for {len(piece)} texts")
            attempt, first_failure = 0, None
            window.on_success(len(piece))
            self._in_flight -= len(piece)
            for (seq, row), response in zip(piece, results):
                self._deliver(seq, row, _result(response))
            self._changed.set()
