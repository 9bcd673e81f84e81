"""The tiered lookup: L1 -> L2 -> L3 -> the Upstream (the model), with
promotion, background write-back and single-flight.

Everything here runs on one event loop. L1 is a dict and L2 reads are one
LMDB read transaction (microseconds), so both run inline; L3 reads and model
calls run in a flight task that belongs to no caller. Writes go to the L2
writer thread and to one L3 writer task: no write sits on a response's path.

What this module promises:
- Values read back from L2 or L3 are untrusted: each is decoded by the
  ValueCodec of the model its key belongs to (size, format, checksum or MAC,
  a label of that model, a finite score in [0, 1], expiry). A value that
  fails is a miss, is counted, is deleted from its tier and never promoted.
- An answer from the model is stored only under the key of the model that
  actually scored it, and reports that model.
- Identical texts that miss at the same time are scored once. Each caller
  waits with its own deadline and gets its own status; the flight lives as
  long as its longest-lived caller, and is withdrawn when nobody waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from cache.entry import BadValue, Entry, Source, ValueCodec
from cache.keys import Keyer
from cache.l1 import KeyFilter
from cache.l1_memory import MemoryTier
from cache.l2_lmdb import LmdbTier
from cache.l3_redis import RedisTier
from cache.upstream import Failed, ModelRef, Scored, Upstream
from protos.errors import Cancelled, DeadlineExceeded, ModelFailed, Overloaded, RateLimitedLog, TiergateError, Unavailable

__all__ = ["Answer", "TieredCache", "CacheOptions"]

log = logging.getLogger(__name__)
_log_limited = RateLimitedLog(log)


@dataclass(frozen=True, slots=True)
class Answer:
    label: str
    score: float
    source: Source
    model: ModelRef  # the model whose answer this is


@dataclass(frozen=True, slots=True)
class CacheOptions:
    # Keys being resolved beyond L2 (L3 reads and model calls) at once in this
    # process; a new key beyond it is refused with RESOURCE_EXHAUSTED before it
    # costs a Redis round trip or a model slot.
    max_pending: int = 4096
    # How long a model answer may be served (every tier keeps it at most its
    # own TTL too). None: the longest TTL of the tiers configured, else 7 days.
    answer_ttl_s: float | None = None
    secret: bytes | None = None  # authenticates L2/L3 values (cache.entry.ValueCodec)
    filter_refresh_s: float | None = 1.0
    filter_refresh_max: int = 4096

    def __post_init__(self) -> None:
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {self.max_pending}")
        if self.answer_ttl_s is not None and not self.answer_ttl_s > 0:
            raise ValueError(f"answer_ttl_s must be > 0, got {self.answer_ttl_s}")
        if self.filter_refresh_s is not None and not self.filter_refresh_s > 0:
            raise ValueError(f"filter_refresh_s must be > 0 or None, got {self.filter_refresh_s}")
        if self.filter_refresh_max < 1:
            raise ValueError(f"filter_refresh_max must be >= 1, got {self.filter_refresh_max}")


@dataclass(eq=False, slots=True)
class _Flight:
    """One key being resolved beyond L2 for whoever waits on `future`."""

    key: bytes
    text: str
    model: ModelRef
    future: asyncio.Future
    deadline: float  # monotonic: the latest deadline of anyone who joined
    lead: "_Lead | None" = None


@dataclass(eq=False, slots=True)
class _Lead:
    """A task resolving some flights together, and how many callers wait on it."""

    flights: list[_Flight]
    waiters: int = 0
    task: asyncio.Task | None = None


_COUNTERS = (
    "hits_l1", "misses_l1", "hits_l2", "hits_l3", "misses", "model_calls", "model_texts", "model_errors",
    "model_other_fingerprint", "singleflight_joined", "duplicates", "filter_skips_l2", "filter_refreshed",
    "writes_l2", "writes_l3", "writes_dropped", "tier_errors", "abandoned", "bad_values_l2", "bad_values_l3",
    "expired_l2", "expired_l3", "refused_pending", "deadline_retries",
)  # fmt: skip

_SHUTTING_DOWN = "the gateway is shutting down; retry on another instance"
_OWN_WRITES_KEPT = 16384  # keys this process wrote to L2 and a refresh has not read back yet


class TieredCache:
    """Answers keys from the nearest tier that holds them, else from `upstream`.

    The KeyFilter gates L2 only. It knows the keys this process wrote to L2 or
    found there, plus what warm_filter()/refresh_filter() read from L2 (which
    other processes on the host share). L3 is shared by every gateway host,
    and no local filter can know what other hosts put there, so L3 is always
    asked when it is configured.
    """

    def __init__(self, l1: MemoryTier, upstream: Upstream, l2: LmdbTier | None = None,
                 l3: RedisTier | None = None, key_filter: KeyFilter | None = None,
                 options: CacheOptions = CacheOptions(), *, clock: Callable[[], float] = time.time) -> None:
        self.l1 = l1
        self.upstream = upstream
        self.l2 = l2
        self.l3 = l3
        self.key_filter = key_filter
        self.options = options
        self.clock = clock  # wall clock: expiry times are shared between processes and hosts
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        ttls = [t.config.ttl_s for t in (l2, l3) if t is not None]
        self._answer_ttl = options.answer_ttl_s or (max(ttls) if ttls else 7 * 86400.0)
        self._flights: dict[bytes, _Flight] = {}
        self._leads: set[_Lead] = set()
        self._codecs: dict[ModelRef, ValueCodec] = {}
        self._keyers: dict[str, Keyer] = {}
        self._l3_pending: list[tuple[bytes, bytes, float]] = []
        self._l3_writer: asyncio.Task[None] | None = None
        self._closed = False
        # Other processes on this host write to the shared L2 too; their keys
        # reach our filter by reading L2's age index now and then.
        self._refresh_s = options.filter_refresh_s if (l2 is not None and key_filter is not None) else None
        self._refresh_due = time.monotonic() + (options.filter_refresh_s or 0.0)
        self._filter_since = int(l2.clock()) if l2 is not None else 0
        self._filter_pos: bytes | None = None  # where the last refresh stopped in L2's age index
        self._own_writes: set[bytes] = set()  # added to the filter by _write_l2, not yet read back by a refresh
        self._own_generation = key_filter.generations if key_filter is not None else 0

    @property
    def pending(self) -> int:
        """Keys being resolved beyond L2 now."""
        return len(self._flights)

    def codec(self, model: ModelRef) -> ValueCodec:
        codec = self._codecs.get(model)
        if codec is None:
            if len(self._codecs) > 8:
                self._codecs.clear()
            codec = self._codecs[model] = ValueCodec(model.labels, self.options.secret)
        return codec

    def keyer(self, fingerprint: str) -> Keyer:
        keyer = self._keyers.get(fingerprint)
        if keyer is None:
            if len(self._keyers) > 8:
                self._keyers.clear()
            keyer = self._keyers[fingerprint] = Keyer(fingerprint)
        return keyer

    # -- filter ---------------------------------------------------------------

    def warm_filter(self) -> int:
        """Add every live L2 key to the filter; returns how many. Blocking (a
        scan of L2): call it at start, before serving."""
        if self.l2 is None or self.key_filter is None:
            return 0
        self._filter_since, self._filter_pos = int(self.l2.clock()), None
        add = self.key_filter.add
        count = 0
        for key in self.l2.iter_keys():
            add(key)
            count += 1
        return count

    def refresh_filter(self) -> int:
        """Learn the keys written to L2 since the last refresh (by any process
        on the host), at most filter_refresh_max per call; returns how many
        were read."""
        return self._refresh_filter_page()[0]

    def _refresh_filter_page(self) -> tuple[int, int]:
        """(keys read, keys added to the filter)."""
        if self.l2 is None or self.key_filter is None:
            return 0, 0
        try:
            keys, self._filter_pos = self.l2.keys_written_since(
                self._filter_since, self.options.filter_refresh_max, after=self._filter_pos
            )
        except Exception as exc:  # an L2 problem must not fail requests
            self._tier_error("l2 refresh", exc)
            return 0, 0
        # Most keys read back are this process's own writes, added as they
        # were written: skip each once (a Bloom add is a dozen hashes in Python).
        # Once the filter rotates, an own write never read back (L2 dropped it)
        # may be gone from it with its generation: forget them all then.
        kf = self.key_filter
        if kf.generations != self._own_generation:
            self._own_writes.clear()
            self._own_generation = kf.generations
        add, own, added = kf.add, self._own_writes, 0
        for key in keys:
            if key in own:
                own.discard(key)
            else:
                add(key)
                added += 1
        self.counters["filter_refreshed"] += len(keys)
        return len(keys), added

    # -- lookups --------------------------------------------------------------

    async def resolve(self, keys: Sequence[bytes], texts: Sequence[str], model: ModelRef,
                      deadline: float) -> list[Answer]:
        """One Answer per key (keys of `model`), in input order, each from the
        nearest tier that holds it. `deadline` is time.monotonic() based.

        Raises the TiergateError of the first text (in input order) that has
        no answer: DeadlineExceeded when this caller's own deadline passes
        first, Overloaded when too many keys are already being resolved.
        """
        n = len(keys)
        if len(texts) != n:
            raise ValueError(f"resolve got {n} keys and {len(texts)} texts")
        if self._closed:
            raise Unavailable(_SHUTTING_DOWN)
        answers: list[Answer | None] = [None] * n
        positions: dict[bytes, list[int]] = {}
        joined: list[_Flight] = []
        fresh: list[int] = []
        l1_get = self.l1.get if self.l1.model == model else None
        flights = self._flights
        for i, key in enumerate(keys):
            where = positions.get(key)
            if where is not None:  # the same key earlier in this call
                where.append(i)
                self.counters["duplicates"] += 1
                continue
            positions[key] = [i]
            entry = l1_get(key) if l1_get is not None else None
            if entry is not None:
                answers[i] = Answer(entry.label, entry.score, Source.L1, model)
                self.counters["hits_l1"] += 1
                continue
            self.counters["misses_l1"] += 1
            flight = flights.get(key)
            if flight is not None and flight.model == model:
                joined.append(flight)
            else:
                fresh.append(i)
        if fresh and self.l2 is not None:
            fresh = self._from_l2(keys, fresh, model, answers)
        if fresh:
            if len(flights) + len(fresh) > self.options.max_pending:
                self.counters["refused_pending"] += len(fresh)
                raise Overloaded(
                    f"the gateway already has {len(flights)} texts waiting for Redis or the model (limit "
                    f"{self.options.max_pending}, --max-pending-misses); retry with backoff"
                )
            loop = asyncio.get_running_loop()
            lead = _Lead([])
            for i in fresh:
                flight = _Flight(keys[i], texts[i], model, loop.create_future(), deadline, lead)
                lead.flights.append(flight)
                flights[keys[i]] = flight
            lead.task = loop.create_task(self._lead(lead))
            self._leads.add(lead)
            joined.extend(lead.flights)
        if not joined:
            return self._fill_duplicates(answers, positions)
        self.counters["singleflight_joined"] += len(joined) - len(fresh)
        leads = {f.lead for f in joined}
        for flight in joined:
            if deadline > flight.deadline:
                flight.deadline = deadline  # the flight lives as long as its longest-lived caller
        for lead in leads:
            lead.waiters += 1
        try:
            futures = [f.future for f in joined]
            # asyncio.wait never cancels what it waits on: this caller leaving
            # (cancelled or out of time) leaves the flight to the others.
            _done, late = await asyncio.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        finally:
            for lead in leads:
                lead.waiters -= 1
                if lead.waiters == 0:
                    self._abandon(lead)
        if late:
            raise DeadlineExceeded("deadline exceeded before the text could be scored")
        for flight in joined:
            error = flight.future.exception()
            if error is not None:
                raise error
            answers[positions[flight.key][0]] = flight.future.result()
        return self._fill_duplicates(answers, positions)

    @staticmethod
    def _fill_duplicates(answers: list[Answer | None], positions: dict[bytes, list[int]]) -> list[Answer]:
        """Every later position of a key gets the answer of its first one."""
        if len(positions) < len(answers):
            for where in positions.values():
                if len(where) > 1:
                    first = answers[where[0]]
                    for i in where[1:]:
                        answers[i] = first
        return answers  # type: ignore[return-value]  # every slot is filled by now

    def _abandon(self, lead: _Lead) -> None:
        """Nobody waits for this lead any more: stop it, so texts nobody wants
        are not scored (the cancellation reaches the model's queue)."""
        if lead.task is None or lead.task.done():
            return
        table = self._flights
        for flight in lead.flights:
            if not flight.future.done():
                self.counters["abandoned"] += 1
            if table.get(flight.key) is flight:
                del table[flight.key]  # a caller arriving from now on starts a fresh flight
        lead.task.cancel()

    async def _lead(self, lead: _Lead) -> None:
        """Resolve flights nobody else is resolving: L3, then the model."""
        try:
            todo = lead.flights
            if self.l3 is not None:
                todo = await self._from_l3(todo)
            if todo:
                await self._from_model(todo)
        except asyncio.CancelledError:
            why = Unavailable(_SHUTTING_DOWN) if self._closed else Cancelled("nobody waits for this text any more")
            self._fail(lead.flights, why)
            raise
        except Exception as exc:
            _log_limited("lead", logging.ERROR, "tiered lookup failed", exc_info=exc)
            self._fail(lead.flights, exc)
        finally:
            # Nothing may be left waiting forever, whatever happened above.
            self._fail(lead.flights, TiergateError("the key was left unresolved (a bug; logged)"))
            self._leads.discard(lead)

    def _settle(self, flight: _Flight, answer: Answer) -> None:
        if not flight.future.done():
            flight.future.set_result(answer)
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    def _fail(self, flights: Sequence[_Flight], exc: BaseException) -> None:
        table = self._flights
        for flight in flights:
            if not flight.future.done():
                flight.future.set_exception(exc)
                flight.future.exception()  # retrieved: a caller that left must not leave it logged
            if table.get(flight.key) is flight:
                del table[flight.key]

    def _decode(self, tier: str, model: ModelRef, key: bytes, value: bytes) -> Entry | None:
        """The entry in a value read back from L2 or L3, or None: absent,
        expired, or a value that cannot be vouched for (counted, deleted)."""
        try:
            entry = self.codec(model).decode(key, value, self.clock())
        except BadValue as exc:
            self.counters[f"bad_values_{tier}"] += 1
            _log_limited(f"bad-{tier}", logging.WARNING,
                         "a %s value failed its check (%s); treated as a miss and deleted", tier, exc.reason)
            self._forget(tier, key)
            return None
        if entry is None:
            self.counters[f"expired_{tier}"] += 1
        return entry

    def _forget(self, tier: str, key: bytes) -> None:
        try:
            if tier == "l2" and self.l2 is not None:
                self.l2.forget_nowait([key])
            elif tier == "l3" and self.l3 is not None and not self._closed:
                task = asyncio.get_running_loop().create_task(self.l3.forget([key]))
                task.add_done_callback(_consume)
        except Exception as exc:
            self._tier_error(f"{tier} forget", exc)

    def _from_l2(self, keys: Sequence[bytes], todo: list[int], model: ModelRef,
                 answers: list[Answer | None]) -> list[int]:
        assert self.l2 is not None
        kf = self.key_filter
        if kf is not None:
            if self._refresh_s is not None and time.monotonic() >= self._refresh_due:
                self._refresh_due = time.monotonic() + self._refresh_s
                self.refresh_filter()
            ask = [i for i in todo if kf.might_contain(keys[i])]
            if len(ask) < len(todo) and self._refresh_s is not None:
                # A "no" is trusted only after catching up with what the other
                # processes of this host wrote to L2 since the last refresh (a
                # read of the age index's recent tail, a cursor seek when there
                # is nothing new); otherwise a text another worker just scored
                # would be scored again. Asked again only if that taught the filter a key.
                learned, read = 0, self.options.filter_refresh_max
                while read >= self.options.filter_refresh_max:
                    read, added = self._refresh_filter_page()
                    learned += added
                if learned:
                    ask = [i for i in todo if kf.might_contain(keys[i])]
            self.counters["filter_skips_l2"] += len(todo) - len(ask)
        else:
            ask = todo
        if not ask:
            return todo
        try:
            found = self.l2.get_many_sync([keys[i] for i in ask])
        except Exception as exc:  # tiers miss rather than raise; this is a backstop
            self._tier_error("l2 read", exc)
            return todo
        hit = set()
        for i, value in zip(ask, found):
            if value is None:
                continue
            entry = self._decode("l2", model, keys[i], value)
            if entry is None:
                continue
            self.l1.put(keys[i], entry, model)
            if kf is not None:
                kf.add(keys[i])
            answers[i] = Answer(entry.label, entry.score, Source.L2, model)
            hit.add(i)
        self.counters["hits_l2"] += len(hit)
        return [i for i in todo if i not in hit] if hit else todo

    async def _from_l3(self, flights: list[_Flight]) -> list[_Flight]:
        assert self.l3 is not None
        try:
            found = await self.l3.get_many([f.key for f in flights])
        except Exception as exc:
            self._tier_error("l3 read", exc)
            return flights
        rest, promote = [], []
        for flight, value in zip(flights, found):
            entry = self._decode("l3", flight.model, flight.key, value) if value is not None else None
            if entry is None:
                rest.append(flight)
                continue
            self.l1.put(flight.key, entry, flight.model)
            promote.append((flight.key, value, entry.expires_at))  # keeps its remaining lifetime
            self._settle(flight, Answer(entry.label, entry.score, Source.L3, flight.model))
        self.counters["hits_l3"] += len(promote)
        if promote:
            self._write_l2(promote)
        return rest

    async def _from_model(self, flights: list[_Flight]) -> None:
        self.counters["misses"] += len(flights)
        todo = flights
        while todo:
            deadline = max(f.deadline for f in todo)
            self.counters["model_calls"] += 1
            self.counters["model_texts"] += len(todo)
            outcomes = await self.upstream.score([f.text for f in todo], deadline)
            if len(outcomes) != len(todo):
                raise RuntimeError(f"upstream returned {len(outcomes)} outcomes for {len(todo)} texts")
            expires_at = self.clock() + self._answer_ttl
            store: list[tuple[bytes, bytes, float]] = []
            retry = []
            for flight, outcome in zip(todo, outcomes):
                if isinstance(outcome, Scored):
                    entry = Entry(outcome.label, outcome.score, expires_at)
                    by = outcome.model
                    if by.fingerprint == flight.model.fingerprint:
                        key = flight.key
                    else:
                        # Scored by another model (a rolling upgrade, a failover):
                        # a true answer of that model, stored under its key only.
                        self.counters["model_other_fingerprint"] += 1
                        key = self.keyer(by.fingerprint).key(flight.text)
                    try:
                        # The same checks as a value read back: a label of that model, a score in [0, 1].
                        value = self.codec(by).encode(key, entry)
                    except BadValue as exc:
                        self.counters["model_errors"] += 1
                        _log_limited("bad-answer", logging.ERROR, "%s answered %r %r (%s); not served",
                                     by.display, outcome.label, outcome.score, exc.reason)
                        self._fail([flight], ModelFailed("the model's answer failed its checks (logged)"))
                        continue
                    self.l1.put(key, entry, by)
                    store.append((key, value, expires_at))
                    self._settle(flight, Answer(entry.label, entry.score, Source.MODEL, by))
                elif isinstance(outcome, Failed):
                    if isinstance(outcome.error, DeadlineExceeded) and flight.deadline > deadline:
                        retry.append(flight)  # a longer-lived caller joined after it was sent
                    else:
                        self.counters["model_errors"] += 1
                        self._fail([flight], outcome.error)
                else:
                    raise TypeError(f"upstream returned {type(outcome).__name__}, expected Scored or Failed")
            if store:
                self._write_l2(store)
                self._write_l3(store)
            self.counters["deadline_retries"] += len(retry)
            todo = retry

    # -- background writes ----------------------------------------------------

    def _write_l2(self, items: list[tuple[bytes, bytes, float]]) -> None:
        if self.l2 is None:
            return
        try:
            self.l2.put_many_nowait(items)  # queued to the L2 writer thread
        except Exception as exc:
            self._tier_error("l2 write", exc)
            return
        self.counters["writes_l2"] += len(items)
        kf = self.key_filter
        if kf is not None:
            own = self._own_writes
            if len(own) > _OWN_WRITES_KEPT:
                own.clear()  # writes L2 dropped are never read back; the cost is only adds done twice
            for key, _value, _expires in items:
                kf.add(key)
                own.add(key)

    def _write_l3(self, items: list[tuple[bytes, bytes, float]]) -> None:
        l3 = self.l3
        if l3 is None or self._closed:
            return
        room = l3.config.max_pending_writes - len(self._l3_pending)
        if room < len(items):
            self.counters["writes_dropped"] += len(items) - max(room, 0)
            items = items[: max(room, 0)]
        if not items:
            return
        self._l3_pending.extend(items)
        if self._l3_writer is None or self._l3_writer.done():
            self._l3_writer = asyncio.get_running_loop().create_task(self._l3_writer_main())

    async def _l3_writer_main(self) -> None:
        # One task drains everything pending in one pipeline per round trip,
        # however many requests queued entries meanwhile.
        assert self.l3 is not None
        while self._l3_pending:
            batch, self._l3_pending = self._l3_pending, []
            try:
                await self.l3.put_many(batch)
            except Exception as exc:
                self._tier_error("l3 write", exc)
                continue
            self.counters["writes_l3"] += len(batch)

    def _tier_error(self, what: str, exc: BaseException) -> None:
        self.counters["tier_errors"] += 1
        _log_limited(what, logging.WARNING, "cache %s failed, treated as a miss: %r", what, exc)

    # -- shutdown -------------------------------------------------------------

    async def close(self, timeout: float = 2.0) -> None:
        """Wait up to `timeout` for lookups and L3 writes in flight, then close
        every tier (L2 writes what it has queued and syncs)."""
        if self._closed:
            return
        pending = [t for t in (*(lead.task for lead in self._leads), self._l3_writer)
                   if t is not None and not t.done()]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=timeout)
            self._closed = True  # from here a cancelled lead tells its callers the gateway is stopping
            for task in late:
                task.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)
        self._closed = True
        for tier in (self.l3, self.l2, self.l1):
            if tier is None:
                continue
            try:
                await tier.close()
            except Exception as exc:
                self._tier_error(f"{tier.name} close", exc)


def _consume(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()

