"""The tiered lookup: L1 -> L2 -> L3 -> model, with promotion, background
write-back and single-flight.

Everything here runs on one event loop. The only blocking work is L1 (a dict)
and L2 reads (an LMDB read transaction, microseconds); L2 writes go to the L2
writer thread and L3 writes to one background task, so no write ever sits on
the path of a response.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from cache.entry import Entry, Source
from cache.l1 import KeyFilter, MemoryTier
from cache.l2_lmdb import LmdbTier
from cache.l3_redis import RedisTier

__all__ = ["Answer", "Scored", "Scorer", "TieredCache"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Answer:
    entry: Entry
    source: Source


@dataclass(frozen=True, slots=True)
class Scored:
    """What a scorer returns for one list of texts."""

    results: list[Entry | BaseException]  # one per text, same order; an exception fails that text's callers
    cacheable: bool = True  # False: answer the callers but store nothing (e.g. the model changed mid-flight)


Scorer = Callable[[list[str]], Awaitable[Scored]]


@dataclass(slots=True, eq=False)
class _Lead:
    """One leader task resolving `keys`, and how many callers wait on it."""

    keys: list[bytes]
    task: asyncio.Task | None = None
    waiters: int = 0

_COUNTERS = (
    "hits_l1", "hits_l2", "hits_l3", "misses", "model_calls", "model_texts", "model_errors",
    "singleflight_joined", "duplicates", "filter_skips_l2", "filter_refreshed",
    "writes_l2", "writes_l3", "writes_dropped", "tier_errors", "abandoned",
)  # fmt: skip


class TieredCache:
    """Answers keys from the nearest tier that holds them, else from `scorer`.

    The KeyFilter gates L2 only. It knows the keys this process wrote to L2 or
    found there, plus what warm_filter()/refresh_filter() read from L2 (which
    other processes on the host share). L3 is shared by every gateway host,
    and no local filter can know what other hosts put there, so L3 is always
    asked when it is configured.
    """

    def __init__(
        self,
        l1: MemoryTier,
        l2: LmdbTier | None = None,
        l3: RedisTier | None = None,
        key_filter: KeyFilter | None = None,
        *,
        filter_refresh_s: float | None = 1.0,
        filter_refresh_max: int = 4096,
    ) -> None:
        if filter_refresh_s is not None and not filter_refresh_s > 0:
            raise ValueError(f"filter_refresh_s must be > 0 or None, got {filter_refresh_s}")
        if filter_refresh_max < 1:
            raise ValueError(f"filter_refresh_max must be >= 1, got {filter_refresh_max}")
        self.l1 = l1
        self.l2 = l2
        self.l3 = l3
        self.key_filter = key_filter
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._inflight: dict[bytes, asyncio.Future[Answer]] = {}
        self._leaders: set[asyncio.Task[None]] = set()
        self._lead_of: dict[bytes, _Lead] = {}
        self._l3_pending: list[tuple[bytes, Entry]] = []
        self._l3_writer: asyncio.Task[None] | None = None
        self._closed = False
        # Other processes on this host write to the shared L2 too; their keys
        # reach our filter by reading L2's age index now and then.
        self._refresh_s = filter_refresh_s if (l2 is not None and key_filter is not None) else None
        self._refresh_max = filter_refresh_max
        self._refresh_due = time.monotonic() + (filter_refresh_s or 0.0)
        self._filter_since = int(l2.clock()) if l2 is not None else 0
        self._filter_pos: bytes | None = None  # where the last refresh stopped in L2's age index

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
        """Add keys written to L2 since the last refresh (by any process on the
        host), at most filter_refresh_max per call; returns how many."""
        if self.l2 is None or self.key_filter is None:
            return 0
        try:
            keys, self._filter_pos = self.l2.keys_written_since(
                self._filter_since, self._refresh_max, after=self._filter_pos
            )
        except Exception as exc:  # an L2 problem must not fail requests
            self._tier_error("l2 refresh", exc)
            return 0
        add = self.key_filter.add
        for key in keys:
            add(key)
        self.counters["filter_refreshed"] += len(keys)
        return len(keys)

    # -- lookups --------------------------------------------------------------

    def peek_l1(self, key: bytes) -> Entry | None:
        """The sync fast path: L1 only. Counts an L1 hit when found."""
        entry = self.l1.get(key)
        if entry is not None:
            self.counters["hits_l1"] += 1
        return entry

    async def resolve(self, keys: Sequence[bytes], texts: Sequence[str], scorer: Scorer) -> list[Answer]:
        """One Answer per key, in input order, each with the tier it came from.

        Keys missing everywhere are scored by `scorer`, once per key however
        many callers want it at the same time. If scoring a text fails, this
        raises that exception (the first in input order) for the whole call.
        """
        n = len(keys)
        if len(texts) != n:
            raise ValueError(f"resolve got {n} keys and {len(texts)} texts")
        if self._closed:
            raise RuntimeError("the tiered cache is closed")
        answers: list[Answer | None] = [None] * n
        waiting: dict[bytes, tuple[asyncio.Future[Answer], list[int]]] = {}
        new_keys: list[bytes] = []
        new_texts: list[str] = []
        l1_get = self.l1.get
        inflight = self._inflight
        loop = asyncio.get_running_loop()
        hits = 0
        for i, key in enumerate(keys):
            slot = waiting.get(key)
            if slot is not None:  # the same key earlier in this call
                slot[1].append(i)
                self.counters["duplicates"] += 1
                continue
            entry = l1_get(key)
            if entry is not None:
                answers[i] = Answer(entry, Source.L1)
                hits += 1
                continue
            fut = inflight.get(key)
            if fut is not None:
                self.counters["singleflight_joined"] += 1
            else:
                fut = loop.create_future()
                inflight[key] = fut
                new_keys.append(key)
                new_texts.append(texts[i])
            waiting[key] = (fut, [i])
        self.counters["hits_l1"] += hits
        if new_keys:
            # The lookups and the scoring run in a task of their own, which
            # owns the futures: if this caller is cancelled, everyone else
            # waiting on these keys still gets their answer.
            lead = _Lead(new_keys)
            lead.task = loop.create_task(self._lead(new_keys, new_texts, scorer))
            for key in new_keys:
                self._lead_of[key] = lead
            self._leaders.add(lead.task)
            lead.task.add_done_callback(lambda t, lead=lead: self._lead_done(lead))
        if waiting:
            futs = [fut for fut, _ in waiting.values()]
            leads = {self._lead_of[key] for key in waiting if key in self._lead_of}
            for lead in leads:
                lead.waiters += 1
            try:
                # shield: cancelling this caller must not cancel shared futures.
                results = await asyncio.shield(asyncio.gather(*futs, return_exceptions=True))
            except asyncio.CancelledError:
                for lead in leads:
                    lead.waiters -= 1
                    if lead.waiters == 0:
                        self._abandon(lead)
                raise
            for lead in leads:
                lead.waiters -= 1
            for (_fut, positions), result in zip(waiting.values(), results):
                if isinstance(result, BaseException):
                    raise result
                for i in positions:
                    answers[i] = result
        return answers  # type: ignore[return-value]  # every slot is filled by now

    def _lead_done(self, lead: _Lead) -> None:
        self._leaders.discard(lead.task)
        for key in lead.keys:
            if self._lead_of.get(key) is lead:
                del self._lead_of[key]

    def _abandon(self, lead: _Lead) -> None:
        """Nobody waits for this lead any more: stop it, so texts nobody wants
        are not scored (the scorer's cancellation reaches the model's queue)."""
        if lead.task is None or lead.task.done():
            return
        self.counters["abandoned"] += len(lead.keys)
        for key in lead.keys:
            # A caller arriving from now on starts a fresh lookup.
            fut = self._inflight.get(key)
            if fut is not None and not fut.done():
                del self._inflight[key]
            if self._lead_of.get(key) is lead:
                del self._lead_of[key]
        lead.task.cancel()

    async def _lead(self, keys: list[bytes], texts: list[str], scorer: Scorer) -> None:
        """Resolve keys nobody else is resolving: L2, L3, then the model."""
        futs = [self._inflight[k] for k in keys]
        try:
            todo = list(range(len(keys)))
            if self.l2 is not None and todo:
                todo = self._from_l2(keys, futs, todo)
            if self.l3 is not None and todo:
                todo = await self._from_l3(keys, futs, todo)
            if todo:
                await self._from_model(keys, futs, texts, todo, scorer)
        except asyncio.CancelledError:
            # close() cancels leaders (tell any waiters why); _abandon() does when nobody waits.
            self._fail(keys, futs, RuntimeError("the tiered cache closed while this key was being resolved"))
            raise
        except Exception as exc:
            log.exception("tiered lookup failed")
            self._fail(keys, futs, exc)
        finally:
            # Nothing may be left waiting forever, whatever happened above.
            self._fail(keys, futs, RuntimeError("key left unresolved by the tiered cache"))

    def _settle(self, key: bytes, fut: asyncio.Future[Answer], answer: Answer) -> None:
        if not fut.done():
            fut.set_result(answer)
        if self._inflight.get(key) is fut:
            del self._inflight[key]

    def _fail(self, keys: Sequence[bytes], futs: Sequence[asyncio.Future[Answer]], exc: BaseException) -> None:
        inflight = self._inflight
        for key, fut in zip(keys, futs):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: a cancelled caller must not leave it logged as unretrieved
            if inflight.get(key) is fut:
                del inflight[key]

    def _from_l2(self, keys: list[bytes], futs: list[asyncio.Future[Answer]], todo: list[int]) -> list[int]:
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
                # would be scored again.
                while self.refresh_filter() >= self._refresh_max:
                    pass
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
        for i, entry in zip(ask, found):
            if entry is not None:
                self.l1.put(keys[i], entry)  # before settling: a newcomer then finds it in L1
                if kf is not None:
                    kf.add(keys[i])
                self._settle(keys[i], futs[i], Answer(entry, Source.L2))
                hit.add(i)
        self.counters["hits_l2"] += len(hit)
        return [i for i in todo if i not in hit] if hit else todo

    async def _from_l3(self, keys: list[bytes], futs: list[asyncio.Future[Answer]], todo: list[int]) -> list[int]:
        assert self.l3 is not None
        try:
            found = await self.l3.get_many([keys[i] for i in todo])
        except Exception as exc:
            self._tier_error("l3 read", exc)
            return todo
        rest, promote = [], []
        for i, entry in zip(todo, found):
            if entry is None:
                rest.append(i)
                continue
            self.l1.put(keys[i], entry)
            promote.append((keys[i], entry))
            self._settle(keys[i], futs[i], Answer(entry, Source.L3))
        self.counters["hits_l3"] += len(promote)
        if promote:
            self._write_l2(promote)
        return rest

    async def _from_model(self, keys: list[bytes], futs: list[asyncio.Future[Answer]], texts: list[str],
                          todo: list[int], scorer: Scorer) -> None:  # fmt: skip
        self.counters["misses"] += len(todo)
        self.counters["model_calls"] += 1
        self.counters["model_texts"] += len(todo)
        try:
            scored = await scorer([texts[i] for i in todo])
            if len(scored.results) != len(todo):
                raise RuntimeError(f"scorer returned {len(scored.results)} results for {len(todo)} texts")
        except Exception as exc:
            # The model is down or failed: every caller of these texts gets it.
            self.counters["model_errors"] += len(todo)
            self._fail([keys[i] for i in todo], [futs[i] for i in todo], exc)
            return
        store: list[tuple[bytes, Entry]] = []
        for i, result in zip(todo, scored.results):
            if isinstance(result, Entry):
                if scored.cacheable:
                    self.l1.put(keys[i], result)
                    store.append((keys[i], result))
                self._settle(keys[i], futs[i], Answer(result, Source.MODEL))
            else:
                if not isinstance(result, BaseException):
                    result = TypeError(f"scorer returned {type(result).__name__}, expected Entry or an exception")
                self.counters["model_errors"] += 1
                self._fail([keys[i]], [futs[i]], result)
        if store:
            self._write_l2(store)
            self._write_l3(store)

    # -- background writes ----------------------------------------------------

    def _write_l2(self, items: list[tuple[bytes, Entry]]) -> None:
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
            for key, _ in items:
                kf.add(key)

    def _write_l3(self, items: list[tuple[bytes, Entry]]) -> None:
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
        log.warning("cache %s failed, treated as a miss: %r", what, exc)

    # -- shutdown -------------------------------------------------------------

    async def close(self, timeout: float = 2.0) -> None:
        """Wait up to `timeout` for lookups and L3 writes in flight, then close
        every tier (L2 writes what it has queued and syncs)."""
        if self._closed:
            return
        pending = [t for t in (*self._leaders, self._l3_writer) if t is not None and not t.done()]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=timeout)
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
