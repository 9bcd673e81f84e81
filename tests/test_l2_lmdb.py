"""L2 on real LMDB: persistence, TTL and remaining lifetimes, the size budget,
forgetting, private files, recovery from an unclean stop, and sharing one
environment between processes. (Damage of every kind: test_l2_damage.py.)"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from cache.l2_lmdb import CLEAN_SHUTDOWN_MARKER, LmdbConfig, LmdbTier

MiB = 1 << 20
FAR = 4_000_000_000.0  # an expires_at beyond any TTL used here


def config(path: Path | str, **kw) -> LmdbConfig:
    kw.setdefault("max_bytes", 4 * MiB)
    kw.setdefault("map_size", 64 * MiB)
    kw.setdefault("sync_interval_s", 0.05)
    return LmdbConfig(path, **kw)


def keys_for(tag: str, n: int) -> list[bytes]:
    # Deterministic keys, so another process can compute the same ones.
    import hashlib

    return [hashlib.blake2b(f"{tag}-{i}".encode(), digest_size=16).digest() for i in range(n)]


def fill(tier: LmdbTier, keys: list[bytes], value: bytes = b"positive") -> None:
    tier.put_many_nowait([(k, value, FAR) for k in keys])
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
        assert tier.get_many_sync(keys) == [b"positive"] * 100
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
        fill(tier, keys, b"old")
        fill(tier, keys, b"new")
        assert tier.get_many_sync(keys) == [b"new"] * 10
        rows, _pos = tier.keys_written_since(0, limit=1000)
        assert sorted(rows) == sorted(keys)  # old age rows were replaced, not left behind
    finally:
        tier.close_sync()


def test_closed_tier_misses_and_drops_instead_of_raising(tmp_path):
    async def main():
        tier = LmdbTier(config(tmp_path))
        await tier.close()
        assert await tier.get_many(keys_for("closed", 2)) == [None, None]
        await tier.put_many([(keys_for("closed", 1)[0], b"x", FAR)])
        tier.forget_nowait(keys_for("closed", 1))

    asyncio.run(main())


# -- TTL --------------------------------------------------------------------------


def test_expired_entries_miss_and_are_removed(tmp_path):
    now = [1_700_000_000.0]
    tier = LmdbTier(config(tmp_path, ttl_s=60), clock=lambda: now[0])
    try:
        old = keys_for("old", 20)
        fill(tier, old)
        assert tier.get_many_sync(old[:1]) == [b"positive"]
        now[0] += 61
        assert tier.get_many_sync(old) == [None] * 20  # expired: a miss
        assert list(tier.iter_keys()) == []
        fresh = keys_for("fresh", 5)
        fill(tier, fresh)  # a write batch also removes expired entries
        assert tier.counters["expired"] == 20
        assert len(tier) == 5
        assert tier.get_many_sync(fresh) == [b"positive"] * 5
    finally:
        tier.close_sync()


def test_an_entry_keeps_its_own_expiry_when_shorter_than_the_ttl(tmp_path):
    # A value promoted from L3 with 10 s left must not get L2's 60 s afresh.
    now = [1_700_000_000.0]
    tier = LmdbTier(config(tmp_path, ttl_s=60), clock=lambda: now[0])
    try:
        short, long_, gone = keys_for("short", 3), keys_for("long", 3), keys_for("gone", 3)
        tier.put_many_nowait([(k, b"short", now[0] + 10) for k in short])
        tier.put_many_nowait([(k, b"long", now[0] + 3600) for k in long_])  # capped at the TTL
        tier.put_many_nowait([(k, b"gone", now[0] - 1) for k in gone])  # already expired: skipped
        assert tier.flush(10)
        assert tier.get_many_sync(short + long_ + gone) == [b"short"] * 3 + [b"long"] * 3 + [None] * 3
        assert len(tier) == 6
        now[0] += 11
        assert tier.get_many_sync(short + long_) == [None] * 3 + [b"long"] * 3
        now[0] += 50
        assert tier.get_many_sync(long_) == [None] * 3
    finally:
        tier.close_sync()


def test_forgotten_keys_are_deleted_with_their_age_rows(tmp_path):
    keys = keys_for("forget", 10)
    tier = LmdbTier(config(tmp_path))
    try:
        fill(tier, keys)
        tier.forget_nowait(keys[:4] + keys_for("never-written", 2))
        assert tier.flush(10)
        assert tier.get_many_sync(keys) == [None] * 4 + [b"positive"] * 6
        assert tier.counters["forgotten"] == 4
        rows, _pos = tier.keys_written_since(0, limit=1000)
        assert sorted(rows) == sorted(keys[4:])
        fill(tier, keys[:1])  # and a forgotten key can be written again
        assert tier.get_many_sync(keys[:1]) == [b"positive"]
    finally:
        tier.close_sync()


# -- private files ---------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_cache_files_are_private_whatever_the_umask(tmp_path):
    path = tmp_path / "l2"
    old_umask = os.umask(0o002)  # a permissive umask: files would be 0664 without an explicit mode
    try:
        tier = LmdbTier(config(path))
        fill(tier, keys_for("private", 10))
        tier.close_sync()
    finally:
        os.umask(old_umask)
    assert _mode(path) == 0o700
    files = sorted(p.name for p in path.iterdir())
    assert {"data.mdb", "lock.mdb", CLEAN_SHUTDOWN_MARKER} <= set(files)
    assert {name: _mode(path / name) for name in files} == dict.fromkeys(files, 0o600)


def test_files_left_readable_by_an_older_version_are_made_private(tmp_path, caplog):
    tier = LmdbTier(config(tmp_path))
    tier.close_sync()
    os.chmod(tmp_path, 0o755)  # someone else's choice of directory mode: warned about, left alone
    for p in tmp_path.iterdir():
        os.chmod(p, 0o644)
    with caplog.at_level("WARNING"):
        tier = LmdbTier(config(tmp_path))
    tier.close_sync()
    assert _mode(tmp_path) == 0o755
    assert {p.name: _mode(p) for p in tmp_path.iterdir()} == dict.fromkeys((p.name for p in tmp_path.iterdir()), 0o600)
    assert any("accessible to other users" in r.getMessage() for r in caplog.records)


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
        assert tier.get_many_sync(written[-1000:]) == [b"positive"] * 1000
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
        assert tier.get_many_sync(key) == [b"positive"]
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
        assert tier.get_many_sync(keys_for("parent", 50)) == [b"parent"] * 50
        assert tier.counters["rebuilt"] == 0
        # ... and writes for the parent to see.
        tier.put_many_nowait([(k, b"child", FAR) for k in keys_for("child", 50)])
        assert tier.flush(10)
    finally:
        tier.close_sync()


def test_two_processes_share_one_l2(tmp_path):
    tier = LmdbTier(config(tmp_path))
    try:
        fill(tier, keys_for("parent", 50), b"parent")
        assert run_in_child(_sharing_child, str(tmp_path)) == 0
        # The child closed while this process still has L2 open: no marker yet.
        assert not (tmp_path / CLEAN_SHUTDOWN_MARKER).exists()
        assert tier.get_many_sync(keys_for("child", 50)) == [b"child"] * 50
        # The child's writes are in the age index, for the KeyFilter refresh.
        rows, _ = tier.keys_written_since(0, limit=1000)
        assert set(keys_for("child", 50)) <= set(rows)
    finally:
        tier.close_sync()
    assert (tmp_path / CLEAN_SHUTDOWN_MARKER).exists()  # the last one out marks it


def _open_and_die(path: str) -> None:
    LmdbTier(config(path))
    os.kill(os.getpid(), 9)  # as the OOM killer, or liblmdb aborting on a damaged page, would


def test_a_user_that_died_makes_the_next_start_check_everything(tmp_path):
    tier = LmdbTier(config(tmp_path))
    try:
        fill(tier, keys_for("parent", 50))
        assert run_in_child(_open_and_die, str(tmp_path)) == -9
    finally:
        tier.close_sync()
    # The last one out closed cleanly, but another user did not: no marker,
    # so the next first opener walks the file before trusting it.
    assert not (tmp_path / CLEAN_SHUTDOWN_MARKER).exists()
    tier = LmdbTier(config(tmp_path))
    tier.close_sync()
    assert (tmp_path / CLEAN_SHUTDOWN_MARKER).exists()
    assert not list(tmp_path.glob("tiergate-user-*"))


def test_writes_beyond_max_pending_are_dropped_not_blocking(tmp_path):
    tier = LmdbTier(config(tmp_path, max_pending_writes=10))
    try:
        # The writer thread may drain between calls; one big call cannot fit.
        tier.put_many_nowait([(k, b"x", FAR) for k in keys_for("many", 25)])
        assert tier.counters["dropped"] == 15
        assert tier.flush(10)
        assert len(tier) == 10
    finally:
        tier.close_sync()


def test_writes_queued_close_together_share_one_transaction(tmp_path):
    # One wake-up of the writer (and one commit) for the writes of many
    # misses, not one each: the writer waits write_delay_s after the first.
    tier = LmdbTier(config(tmp_path, sync_interval_s=1.0, write_delay_s=0.2))
    try:
        for key in keys_for("together", 20):
            tier.put_many_nowait([(key, b"x", FAR)])
        assert tier.flush(10)
        assert len(tier) == 20
        assert tier.counters["write_transactions"] == 1
    finally:
        tier.close_sync()
    tier = LmdbTier(config(tmp_path / "at-once", write_delay_s=0))
    try:
        for key in keys_for("apart", 3):
            tier.put_many_nowait([(key, b"x", FAR)])
            assert tier.flush(10)
        assert tier.counters["write_transactions"] == 3
    finally:
        tier.close_sync()
