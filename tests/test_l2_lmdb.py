"""L2 on real LMDB: persistence, TTL, the size budget, recovery from an unclean
stop, and sharing one environment between processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from pathlib import Path

import pytest

from cache import Entry, LmdbConfig, LmdbTier
from cache.l2_lmdb import CLEAN_SHUTDOWN_MARKER

MiB = 1 << 20


def config(path: Path | str, **kw) -> LmdbConfig:
    kw.setdefault("max_bytes", 4 * MiB)
    kw.setdefault("map_size", 64 * MiB)
    kw.setdefault("sync_interval_s", 0.05)
    return LmdbConfig(path, **kw)


def keys_for(tag: str, n: int) -> list[bytes]:
    # Deterministic keys, so another process can compute the same ones.
    import hashlib

    return [hashlib.blake2b(f"{tag}-{i}".encode(), digest_size=16).digest() for i in range(n)]


def fill(tier: LmdbTier, keys: list[bytes], label: str = "positive") -> None:
    tier.put_many_nowait([(k, Entry(label, 0.5)) for k in keys])
    assert tier.flush(10)


def run_in_child(target, *args) -> int:
    """Run target(*args) in a fresh spawned process: exit code (negative = signal)."""
    proc = multiprocessing.get_context("spawn").Process(target=target, args=args)
    proc.start()
    proc.join(60)
    if proc.is_alive():
        proc.kill()
        proc.join()
    code = proc.exitcode
    proc.close()
    return code


# -- config ---------------------------------------------------------------------


def test_config_validates_with_the_bad_value_in_the_message(tmp_path):
    with pytest.raises(ValueError, match="L2 max_bytes must be > 0, got -1"):
        LmdbConfig(tmp_path, max_bytes=-1)
    with pytest.raises(ValueError, match="got 0"):
        LmdbConfig(tmp_path, ttl_s=0)
    with pytest.raises(ValueError, match="got 1000"):
        LmdbConfig(tmp_path, max_bytes=MiB, map_size=1000)
    assert LmdbConfig(tmp_path, max_bytes=MiB).map_size == 1 << 30
    assert LmdbConfig(tmp_path, max_bytes=1 << 30).map_size == 4 << 30


# -- basics ---------------------------------------------------------------------


def test_persists_across_close_and_reopen(tmp_path):
    keys = keys_for("persist", 100)
    tier = LmdbTier(config(tmp_path))
    fill(tier, keys)
    tier.close_sync()
    assert (tmp_path / CLEAN_SHUTDOWN_MARKER).exists()

    tier = LmdbTier(config(tmp_path))
    try:
        assert not (tmp_path / CLEAN_SHUTDOWN_MARKER).exists()  # absent while open
        assert tier.get_many_sync(keys) == [Entry("positive", 0.5)] * 100
        assert sorted(tier.iter_keys()) == sorted(keys)
        assert tier.counters["rebuilt"] == 0
    finally:
        tier.close_sync()


def test_one_process_cannot_open_a_directory_twice(tmp_path):
    tier = LmdbTier(config(tmp_path))
    try:
        with pytest.raises(RuntimeError, match="already open"):
            LmdbTier(config(tmp_path))
    finally:
        tier.close_sync()
    LmdbTier(config(tmp_path)).close_sync()  # and once closed, it can be opened again


def test_overwrite_keeps_one_age_row_per_key(tmp_path):
    keys = keys_for("over", 10)
    tier = LmdbTier(config(tmp_path))
    try:
        fill(tier, keys, "old")
        fill(tier, keys, "new")
        assert tier.get_many_sync(keys) == [Entry("new", 0.5)] * 10
        rows, _pos = tier.keys_written_since(0, limit=1000)
        assert sorted(rows) == sorted(keys)  # old age rows were replaced, not left behind
    finally:
        tier.close_sync()


def test_closed_tier_misses_and_drops_instead_of_raising(tmp_path):
    async def main():
        tier = LmdbTier(config(tmp_path))
        await tier.close()
        assert await tier.get_many(keys_for("closed", 2)) == [None, None]
        await tier.put_many([(keys_for("closed", 1)[0], Entry("x", 1.0))])

    asyncio.run(main())


# -- TTL --------------------------------------------------------------------------


def test_expired_entries_miss_and_are_removed(tmp_path):
    now = [1_700_000_000.0]
    tier = LmdbTier(config(tmp_path, ttl_s=60), clock=lambda: now[0])
    try:
        old = keys_for("old", 20)
        fill(tier, old)
        assert tier.get_many_sync(old[:1]) == [Entry("positive", 0.5)]
        now[0] += 61
        assert tier.get_many_sync(old) == [None] * 20  # expired: a miss
        assert list(tier.iter_keys()) == []
        fresh = keys_for("fresh", 5)
        fill(tier, fresh)  # a write batch also removes expired entries
        assert tier.counters["expired"] == 20
        assert len(tier) == 5
        assert tier.get_many_sync(fresh) == [Entry("positive", 0.5)] * 5
    finally:
        tier.close_sync()


# -- the size budget -----------------------------------------------------------


def test_size_budget_keeps_used_bytes_under_max_bytes(tmp_path):
    budget = 1 * MiB
    tier = LmdbTier(config(tmp_path, max_bytes=budget))
    try:
        written = []
        for round_ in range(40):  # about 4x what fits in the budget
            keys = keys_for(f"budget-{round_}", 1000)
            fill(tier, keys)
            written.extend(keys)
            assert tier.used_bytes() <= budget
        assert tier.counters["evicted"] > 0
        assert tier.counters["dropped"] == 0
        held = len(tier)
        assert 0 < held < len(written)
        # Oldest writes went first, the newest are all still there.
        assert tier.get_many_sync(written[-1000:]) == [Entry("positive", 0.5)] * 1000
        assert tier.get_many_sync(written[:1000]) == [None] * 1000
        # The budget is used, not thrown away in big cliffs.
        assert tier.used_bytes() > 0.6 * budget
        # Freed pages are reused: the file plateaus at a small multiple of the
        # budget (small databases have relatively more copy-on-write overhead).
        assert os.path.getsize(tmp_path / "data.mdb") < 8 * budget
    finally:
        tier.close_sync()


# -- unclean stop -----------------------------------------------------------------


def _reopen_child(path: str, expect_rebuilt: int, expect_len: int) -> None:
    """Open L2 after an unclean stop. Runs in a child process: if the check
    ever let LMDB touch a truncated file, SIGBUS kills the child, not pytest."""
    tier = LmdbTier(config(path))
    try:
        assert tier.counters["rebuilt"] == expect_rebuilt, tier.counters
        assert len(tier) == expect_len, len(tier)
        key = keys_for("after", 1)
        fill(tier, key)
        assert tier.get_many_sync(key) == [Entry("positive", 0.5)]
    finally:
        tier.close_sync()


def _unclean_stop(path: Path, n: int = 3000) -> None:
    tier = LmdbTier(config(path))
    fill(tier, keys_for("before", n))
    tier.close_sync()
    # Without the marker this looks like a process that died with L2 open.
    (path / CLEAN_SHUTDOWN_MARKER).unlink()


def test_unclean_stop_with_intact_data_keeps_it(tmp_path):
    _unclean_stop(tmp_path)
    assert run_in_child(_reopen_child, str(tmp_path), 0, 3000) == 0


def test_truncated_data_file_after_unclean_stop_is_rebuilt(tmp_path):
    _unclean_stop(tmp_path)
    data = tmp_path / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    assert run_in_child(_reopen_child, str(tmp_path), 1, 0) == 0
    # Now it is safe in this process too.
    tier = LmdbTier(config(tmp_path))
    try:
        assert tier.counters["rebuilt"] == 0
        assert len(tier) == 1
    finally:
        tier.close_sync()


def test_garbled_pages_after_unclean_stop_are_rebuilt(tmp_path):
    _unclean_stop(tmp_path)
    with open(tmp_path / "data.mdb", "r+b") as f:
        f.seek(4 * 4096)
        f.write(os.urandom(8 * 4096))
    assert run_in_child(_reopen_child, str(tmp_path), 1, 0) == 0


# -- two processes, one environment ----------------------------------------------


def _sharing_child(path: str) -> None:
    tier = LmdbTier(config(path))
    try:
        # Sees what the parent wrote ...
        assert tier.get_many_sync(keys_for("parent", 50)) == [Entry("parent", 0.5)] * 50
        assert tier.counters["rebuilt"] == 0
        # ... and writes for the parent to see.
        tier.put_many_nowait([(k, Entry("child", 0.25)) for k in keys_for("child", 50)])
        assert tier.flush(10)
    finally:
        tier.close_sync()


def test_two_processes_share_one_l2(tmp_path):
    tier = LmdbTier(config(tmp_path))
    try:
        fill(tier, keys_for("parent", 50), "parent")
        assert run_in_child(_sharing_child, str(tmp_path)) == 0
        # The child closed while this process still has L2 open: no marker yet.
        assert not (tmp_path / CLEAN_SHUTDOWN_MARKER).exists()
        assert tier.get_many_sync(keys_for("child", 50)) == [Entry("child", 0.25)] * 50
        # The child's writes are in the age index, for the KeyFilter refresh.
        rows, _ = tier.keys_written_since(0, limit=1000)
        assert set(keys_for("child", 50)) <= set(rows)
    finally:
        tier.close_sync()
    assert (tmp_path / CLEAN_SHUTDOWN_MARKER).exists()  # the last one out marks it


def test_writes_beyond_max_pending_are_dropped_not_blocking(tmp_path):
    tier = LmdbTier(config(tmp_path, max_pending_writes=10))
    try:
        # The writer thread may drain between calls; one big call cannot fit.
        tier.put_many_nowait([(k, Entry("x", 0.5)) for k in keys_for("many", 25)])
        assert tier.counters["dropped"] == 15
        assert tier.flush(10)
        assert len(tier) == 10
    finally:
        tier.close_sync()
