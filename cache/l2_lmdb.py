"""L2: an LMDB environment on local disk, shared by every gateway process on a
host and kept across restarts.

It stores opaque value bytes (cache.entry.ValueCodec makes and checks them:
this module never trusts or parses them). LMDB has no TTL and no size bound,
so both are built here: every stored value carries an L2 header with its
expiry and write time, an `age` index orders keys oldest-first for eviction,
and one writer thread per process enforces the byte budget after each batch.
Reads are inline (microseconds); writes never block the caller.
Opening, the checks that move a damaged directory aside and the
clean-shutdown marker live in cache.l2_recovery. Corruption that liblmdb
reports while running (damage done after the start's check) makes the reads
and writes that reach it miss or drop; it is logged once and recorded, and
the next start moves the file aside.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import queue
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import lmdb

from cache.l2_recovery import CLEAN_SHUTDOWN_MARKER, CORRUPTION, EnvUse
from protos.logs import Trouble

__all__ = ["LmdbConfig", "LmdbTier", "CLEAN_SHUTDOWN_MARKER", "BYTES_PER_ENTRY", "filter_capacity_for"]

log = logging.getLogger(__name__)

_READ_KINDS = frozenset({"read", "scan", "age scan"})  # the rest are writes (write, mapfull, evict, sync, writer)

MiB = 1 << 20
GiB = 1 << 30

# Stored value: expires_at (unix seconds), written_at (unix microseconds), then
# the value bytes handed in. Microseconds, not seconds, order the age index:
# with whole seconds, every write of the oldest second would tie and evict in
# key order, i.e. at random, which matters whenever the cache holds only
# seconds of writes.
_HEADER = struct.Struct("<IQ")
_AGE = struct.Struct(">Q")  # big-endian written_at, so the age index sorts oldest-first
_US = 1_000_000
_U32_MAX = 2**32 - 1
_BATCH = 512  # items per write transaction
_EXPIRE_PER_PASS = 1024  # expired entries removed per write batch / idle tick
_SCAN_CHUNK = 10_000  # keys per read transaction when scanning
_DBS = (b"entries", b"age")

# Eviction (see _enforce_budget): start above 95% of the budget, aim for 90%.
_HIGH_WATER = 0.95
_LOW_WATER = 0.90

# Bytes of pages in use per entry, both B-trees included, with 16-byte keys
# and ValueCodec values (26 bytes + the label) behind the 12-byte header,
# measured here: 162 (1-byte labels) to 174 ("positive") when the budget is
# first reached, the densest L2 gets; then ~200 as eviction leaves holes. So
# the default 512 MiB holds at most about 3.3M entries. Rounded down, so that
# estimates of how many entries L2 holds err high.
BYTES_PER_ENTRY = 150

_STOP = object()
_WAKE = object()


def _expires(stored: bytes) -> int:
    # A stored value too short for its header is damage: treat it as expired,
    # so that expiry removes it instead of stalling on it.
    return _HEADER.unpack_from(stored)[0] if len(stored) >= _HEADER.size else 0


def _written_us(stored: bytes) -> int:
    return _HEADER.unpack_from(stored)[1] if len(stored) >= _HEADER.size else 0


@dataclass(frozen=True, slots=True)
class LmdbConfig:
    path: str | os.PathLike[str]
    max_bytes: int = 512 * MiB
    ttl_s: float = 7 * 86400.0
    # None: max(4 * max_bytes, 1 GiB). Reserving address space is free, and
    # LMDB fails hard (MapFullError) when the map fills, so reserve plenty and
    # enforce our own, smaller budget.
    map_size: int | None = None
    sync_interval_s: float = 1.0
    # The writer thread, woken by a write, waits this long for more before it
    # writes them all in one transaction: at a few hundred misses a second it
    # wakes (and takes the GIL from the event loop) once per delay, not once
    # per text. The writing process's L1 answers the text meanwhile.
    write_delay_s: float = 0.02
    # Entries queued for the writer beyond this are dropped (and counted), so a
    # writer stalled on another process's write lock cannot grow memory forever.
    max_pending_writes: int = 100_000

    def __post_init__(self) -> None:
        if not os.fspath(self.path):
            raise ValueError("L2 path must not be empty")
        if self.max_bytes <= 0:
            raise ValueError(f"L2 max_bytes must be > 0, got {self.max_bytes}")
        if not 0 < self.ttl_s <= _U32_MAX:
            raise ValueError(f"L2 ttl_s must be in (0, {_U32_MAX}], got {self.ttl_s}")
        if self.map_size is None:
            object.__setattr__(self, "map_size", max(4 * self.max_bytes, GiB))
        elif self.map_size < 2 * self.max_bytes:
            raise ValueError(
                f"L2 map_size must be >= 2 * max_bytes ({2 * self.max_bytes}), got {self.map_size}"
            )
        if not self.sync_interval_s > 0:
            raise ValueError(f"L2 sync_interval_s must be > 0, got {self.sync_interval_s}")
        if not 0 <= self.write_delay_s <= 1:
            raise ValueError(f"L2 write_delay_s must be in 0..1 s, got {self.write_delay_s}")
        if self.max_pending_writes < 1:
            raise ValueError(f"L2 max_pending_writes must be >= 1, got {self.max_pending_writes}")


def filter_capacity_for(config: LmdbConfig) -> int:
    """Keys per KeyFilter generation for an L2 of this budget: about as many
    entries as the budget holds, so that a filter warmed from a full L2
    remembers all of it in one generation (and, with the previous one, every
    key written since)."""
    return max(1000, math.ceil(config.max_bytes / BYTES_PER_ENTRY))


class LmdbTier:
    """The L2 tier. Open one per process per directory, after the process has
    started (an LMDB environment does not survive fork)."""

    name = "l2"

    def __init__(self, config: LmdbConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock  # wall clock: expiry times are shared between processes
        self.path = os.path.abspath(os.fspath(config.path))
        self.counters: dict[str, int] = dict.fromkeys(
            ("hits", "misses", "writes", "write_transactions", "evicted", "expired", "rebuilt",
             "write_errors", "read_errors", "dropped", "forgotten", "damaged"), 0)  # fmt: skip
        self._trouble = Trouble(log, f"L2 at {self.path}")  # logs when errors start, go on, and end
        self._pending = 0
        self._pending_lock = threading.Lock()
        # Held by readers for the length of a read transaction, and by whoever
        # resizes or closes the environment: both need no transaction active.
        self._gate = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._damage_seen = False
        self._resize_needed = False
        self._close_lock = threading.Lock()

        self._use = EnvUse(self.path)  # refuses a directory already open in this process
        env = None
        try:
            env, (self._entries, self._age) = self._use.open(self.config.map_size, _DBS)
            self._env = env
            if self._use.rebuilt:
                self.counters["rebuilt"] += 1
            self._main = env.open_db(None)
            self._psize = env.stat()["psize"]
        except BaseException:
            if env is not None:
                env.close()
            self._use.release(clean=False)
            raise
        self._writer = threading.Thread(target=self._writer_main, name="tiergate-l2-writer", daemon=True)
        self._writer.start()

    # -- closing --------------------------------------------------------------

    def close_sync(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to `timeout`), sync, close, and mark the
        directory as cleanly closed when this was the last process using it."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.flush(timeout)
        self._queue.put(_STOP)
        self._writer.join()
        with self._gate:
            try:
                self._env.sync(True)
            except lmdb.Error as exc:
                self._failed("sync", exc)
            self._env.close()
        self._use.release(clean=True)

    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)  # flush and sync block

    # -- reads ----------------------------------------------------------------

    def get_many_sync(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The stored value bytes of each key; None when absent or expired by
        L2's own clock. The bytes are untrusted: decode them with ValueCodec,
        and forget_nowait() the keys whose values fail."""
        out: list[bytes | None] = [None] * len(keys)
        if self._closed or not keys:
            return out
        now = self.clock()
        size = _HEADER.size
        try:
            with self._gate, self._env.begin(db=self._entries, buffers=False) as txn:
                get = txn.get
                for i, key in enumerate(keys):
                    stored = get(key)
                    if stored is None:
                        continue
                    if len(stored) < size:
                        out[i] = stored  # damaged: the codec refuses it, and the caller forgets it
                    elif _HEADER.unpack_from(stored)[0] > now:
                        out[i] = stored[size:]
                    # else expired: a miss; the writer removes it later
        except lmdb.MapResizedError:
            # Another process grew the map. Resizing needs no transaction of
            # this process open, which only the writer can arrange: ask it, and
            # miss meanwhile.
            self._resize_needed = True
            self._queue.put(_WAKE)
            out = [None] * len(keys)
        except lmdb.Error as exc:
            self._read_failed("read", exc)
            out = [None] * len(keys)
        else:
            if self._trouble.failing:
                self._trouble.ok("reads")
        hits = sum(v is not None for v in out)
        self.counters["hits"] += hits
        self.counters["misses"] += len(keys) - hits
        return out

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        # Inline, not in a thread: an LMDB read is a few microseconds, far less
        # than a hop to an executor.
        return self.get_many_sync(keys)

    def iter_keys(self) -> Iterator[bytes]:
        """Every live (unexpired) key, e.g. to warm the KeyFilter at start.
        Reads in chunks, each in a short transaction: a long-lived reader would
        stop LMDB from reusing freed pages. Stops early (logged, counted) if
        liblmdb reports the file damaged."""
        after: bytes | None = None
        while not self._closed:
            chunk: list[bytes] = []
            now = self.clock()
            try:
                with self._gate, self._env.begin(db=self._entries, buffers=False) as txn:
                    cur = txn.cursor()
                    found = cur.set_range(after) if after is not None else cur.first()
                    if found and after is not None and cur.key() == after:
                        found = cur.next()
                    while found and len(chunk) < _SCAN_CHUNK:
                        key, stored = cur.item()
                        if _expires(stored) > now:
                            chunk.append(key)
                        after = key
                        found = cur.next()
            except lmdb.Error as exc:
                self._read_failed("scan", exc)
                found = False
            yield from chunk
            if not found:
                return

    def keys_written_since(self, since: float, limit: int = _SCAN_CHUNK,
                           after: bytes | None = None) -> tuple[list[bytes], bytes | None]:  # fmt: skip
        """Keys written (by any process on the host) at or after unix second
        `since`, oldest first, at most `limit`; or, given `after` (the position
        a previous call returned), the ones written after that position. Lets a
        process learn the other processes' writes by reading the age index."""
        keys: list[bytes] = []
        if self._closed:
            return keys, after
        try:
            with self._gate, self._env.begin(db=self._age, buffers=False) as txn:
                cur = txn.cursor()
                found = cur.set_range(after if after is not None else _AGE.pack(max(0, int(since * _US))))
                if found and after is not None and cur.key() == after:
                    found = cur.next()
                while found and len(keys) < limit:
                    after = cur.key()
                    keys.append(after[_AGE.size :])
                    found = cur.next()
        except lmdb.Error as exc:
            self._read_failed("age scan", exc)
        return keys, after

    def used_bytes(self) -> int:
        """Bytes in pages that hold data (all three B-trees); free pages, which
        LMDB reuses, are not counted. This is what the budget bounds."""
        with self._gate, self._env.begin() as txn:
            return self._used(txn)

    def __len__(self) -> int:
        with self._gate, self._env.begin() as txn:
            return txn.stat(self._entries)["entries"]

    # -- writes ---------------------------------------------------------------

    async def put_many(self, items: Sequence[tuple[bytes, bytes, float]]) -> None:
        self.put_many_nowait(items)

    def put_many_nowait(self, items: Sequence[tuple[bytes, bytes, float]]) -> None:
        """Queue (key, value bytes, expires_at unix seconds) for the writer
        thread and return at once. L2 keeps each until min(expires_at, now +
        ttl_s): a value promoted from L3 keeps its remaining lifetime. Items
        already expired are skipped."""
        if self._closed or not items:
            return
        now = self.clock()
        todo = [(key, value, expires_at) for key, value, expires_at in items if expires_at > now]
        self._enqueue(todo)

    def forget_nowait(self, keys: Sequence[bytes]) -> None:
        """Queue the deletion of these keys (values that failed validation);
        the writer thread deletes them in order with the writes queued before."""
        if not self._closed and keys:
            self._enqueue([(key, None, 0.0) for key in keys])

    async def forget(self, keys: Sequence[bytes]) -> None:
        self.forget_nowait(keys)

    def _enqueue(self, todo: list[tuple[bytes, bytes | None, float]]) -> None:
        if not todo:
            return
        with self._pending_lock:
            room = self.config.max_pending_writes - self._pending
            if room < len(todo):
                self.counters["dropped"] += len(todo) - max(room, 0)
                todo = todo[: max(room, 0)]
            self._pending += len(todo)
        for start in range(0, len(todo), _BATCH):
            self._queue.put(todo[start : start + _BATCH])

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until everything queued before this call is written. Returns
        False on timeout. Blocking: from async code use asyncio.to_thread."""
        if not self._writer.is_alive():
            return self._queue.empty()
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def _writer_main(self) -> None:
        interval = self.config.sync_interval_s
        delay = min(self.config.write_delay_s, interval)
        last_sync = last_tick = time.monotonic()
        dirty = False
        stop = False
        while not stop:
            wait = max(0.0, interval - (time.monotonic() - (last_sync if dirty else last_tick)))
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if isinstance(item, list) and delay:
                time.sleep(delay)  # let the writes that follow share the transaction
            batch: list[tuple[bytes, bytes | None, float]] = []
            events: list[threading.Event] = []
            while item is not None:
                if item is _STOP:
                    stop = True
                    break
                if item is _WAKE:
                    pass
                elif isinstance(item, threading.Event):
                    events.append(item)
                else:
                    batch.extend(item)
                if len(batch) >= _BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            try:
                if self._resize_needed:
                    self._adopt_map_size()
                if batch:
                    self._write_batch(batch)
                    self.counters["write_transactions"] += 1
                    dirty = True
                now = time.monotonic()
                if now - last_tick >= interval:
                    last_tick = now
                    self._idle_maintenance()
                if dirty and (now - last_sync >= interval or stop):
                    self._env.sync(True)
                    last_sync, dirty = now, False
            except Exception as exc:  # never let the writer die: the cache just stops filling
                self.counters["write_errors"] += 1
                if isinstance(exc, CORRUPTION):
                    self._damaged("write", exc)
                else:
                    self._failed("writer", exc)
            finally:
                if batch:
                    with self._pending_lock:
                        self._pending -= len(batch)
                for event in events:
                    event.set()
        # Whatever is still queued after the stop is dropped: close has flushed.
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, threading.Event):
                item.set()
            elif isinstance(item, list):
                self.counters["dropped"] += len(item)

    def _write_batch(self, batch: list[tuple[bytes, bytes | None, float]]) -> None:
        for attempt in range(3):
            try:
                clock = self.clock()
                now = int(clock)
                now_us = int(clock * _US)
                limit = min(now + math.ceil(self.config.ttl_s), _U32_MAX)
                age_now = _AGE.pack(now_us)
                written = forgotten = 0
                with self._env.begin(write=True, db=self._entries) as txn:
                    for key, value, expires_at in batch:
                        expires = int(min(expires_at, limit)) if value is not None else 0
                        if value is not None and expires <= now:
                            continue  # expired while queued
                        old = txn.get(key)
                        if old is not None:  # overwrite or forget: drop the old age row
                            txn.delete(_AGE.pack(_written_us(old)) + key, db=self._age)
                        if value is None:
                            if old is not None:
                                txn.delete(key)
                                forgotten += 1
                            continue
                        txn.put(key, _HEADER.pack(expires, now_us) + value)
                        txn.put(age_now + key, b"", db=self._age)
                        written += 1
                    self._enforce_budget(txn, now, len(batch))
                self.counters["writes"] += written
                self.counters["forgotten"] += forgotten
                if self._trouble.failing:
                    self._trouble.ok("writes")
                return
            except lmdb.MapFullError as exc:
                if attempt == 0:
                    self._failed("mapfull", exc)
                    self._evict_hard()
                    continue
                break
            except lmdb.MapResizedError:
                self._adopt_map_size()
                continue
            except CORRUPTION as exc:
                self._damaged("write", exc)
                break
            except lmdb.Error as exc:
                self._failed("write", exc)
                break
        self.counters["write_errors"] += 1
        self.counters["dropped"] += len(batch)

    def _used(self, txn: lmdb.Transaction) -> int:
        pages = 0
        for db in (self._main, self._entries, self._age):
            s = txn.stat(db)
            pages += s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
        return pages * self._psize

    def _enforce_budget(self, txn: lmdb.Transaction, now: int, batch_len: int) -> None:
        """Keep the pages in use under max_bytes, oldest writes out first.

        Keys are hashes, so the oldest entries are scattered over the whole
        `entries` B-tree: deleting them leaves holes in pages rather than
        freeing pages (LMDB only merges pages under 25% full). Deleting "until
        used bytes < 90%" would therefore throw out a third or more of the
        cache at once. Instead, past 95% of the budget, evict about what brings
        the estimate to 90%, at most twice this batch per batch: the holes
        absorb the following writes, so pages plateau just under the budget
        and the entry count stays steady. A hard stop keeps pages <= max_bytes.
        """
        self._expire(txn, now, _EXPIRE_PER_PASS)
        budget = self.config.max_bytes
        used = self._used(txn)
        if used <= _HIGH_WATER * budget:
            return
        n = txn.stat(self._entries)["entries"]
        need = math.ceil(n * (used - _LOW_WATER * budget) / used)
        self._evict_oldest(txn, min(need, max(2 * batch_len, 1024)))
        used = self._used(txn)
        while used > budget:
            n = txn.stat(self._entries)["entries"]
            if n == 0 or self._evict_oldest(txn, max(1, n // 64)) == 0:
                break
            used = self._used(txn)

    def _evict_oldest(self, txn: lmdb.Transaction, count: int) -> int:
        cur = txn.cursor(db=self._age)
        done = 0
        found = cur.first()
        while found and done < count:
            txn.delete(cur.key()[_AGE.size :], db=self._entries)
            found = cur.delete()  # moves to the next row
            done += 1
        self.counters["evicted"] += done
        return done

    def _expire(self, txn: lmdb.Transaction, now: int, limit: int) -> int:
        # All processes write with their config's TTL, so expiry follows write
        # order closely: walk from the oldest and stop at the first live one.
        cur = txn.cursor(db=self._age)
        done = 0
        found = cur.first()
        while found and done < limit:
            key = cur.key()[_AGE.size :]
            value = txn.get(key, db=self._entries)
            if value is not None and _expires(value) > now:
                break
            if value is not None:
                txn.delete(key, db=self._entries)
            found = cur.delete()
            done += 1
        self.counters["expired"] += done
        return done

    def _idle_maintenance(self) -> None:
        self._env.reader_check()  # dead readers would pin pages and grow the file
        now = int(self.clock())
        # Look before taking the write lock, which every process on the host shares.
        with self._gate, self._env.begin(db=self._age) as txn:
            cur = txn.cursor()
            if not cur.first():
                return
            value = txn.get(cur.key()[_AGE.size :], db=self._entries)
            if value is not None and _expires(value) > now:
                return
        with self._env.begin(write=True) as txn:
            self._expire(txn, now, _EXPIRE_PER_PASS)

    def _evict_hard(self) -> None:
        """The map is full (a reader pinning old pages, or a budget far above
        what the map can hold): drop the oldest quarter, in small transactions
        so that each one needs few new pages."""
        try:
            with self._env.begin() as txn:
                target = txn.stat(self._entries)["entries"] // 4
            while target > 0:
                with self._env.begin(write=True) as txn:
                    done = self._evict_oldest(txn, min(target, _BATCH))
                if done == 0:
                    break
                target -= done
        except lmdb.Error as exc:
            self._failed("evict", exc)

    def _adopt_map_size(self) -> None:
        # Another process grew the map: adopt its size. Needs no transaction of
        # this process open: only the writer calls this, between its own
        # transactions, and the gate keeps readers out meanwhile.
        with self._gate:
            self._resize_needed = False
            self._env.set_mapsize(0)

    def _read_failed(self, kind: str, exc: lmdb.Error) -> None:
        self.counters["read_errors"] += 1
        if isinstance(exc, CORRUPTION):
            self._damaged(kind, exc)
        else:
            self._failed(kind, exc)

    def _damaged(self, kind: str, exc: lmdb.Error) -> None:
        """liblmdb says the file is damaged (any thread). Go on with what still
        works, and record it, so that the next start moves the file aside."""
        self.counters["damaged"] += 1
        if self._damage_seen:
            log.debug("L2 %s: %r", kind, exc)
            return
        self._damage_seen = True
        self._use.mark_damaged(f"{kind}: {exc}")
        log.warning("L2 at %s is damaged (%s: %s): what reaches the damage misses, or is not written; "
                    "it will be moved aside at the next start", self.path, kind, exc)  # fmt: skip

    def _failed(self, kind: str, exc: BaseException) -> None:
        self._trouble.failed("reads" if kind in _READ_KINDS else "writes", exc)
