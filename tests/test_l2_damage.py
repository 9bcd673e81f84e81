"""Issue 9 item 4: whatever state L2's files are in, a gateway opening it
starts (empty or partial), logs one clear line, and serves. Never a crash
loop, never SIGBUS.

Each damaged directory is opened in a spawned child process: if the checks
ever let liblmdb touch a page past the end of a truncated file, SIGBUS kills
the child, and the test sees its exit code instead of dying itself.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
from pathlib import Path

import pytest

from cache.entry import BadValue, Entry, ValueCodec
from cache.l2_lmdb import CLEAN_SHUTDOWN_MARKER, LmdbConfig, LmdbTier
from cache.l2_recovery import DAMAGE_MARKER, check_header

MiB = 1 << 20
PSIZE = os.sysconf("SC_PAGE_SIZE")
LABELS = ("negative", "positive")
N = 3000


def config(path: Path | str) -> LmdbConfig:
    return LmdbConfig(path, max_bytes=4 * MiB, map_size=64 * MiB, sync_interval_s=0.05)


def keys_for(tag: str, n: int) -> list[bytes]:
    import hashlib

    return [hashlib.blake2b(f"{tag}-{i}".encode(), digest_size=16).digest() for i in range(n)]


def entry_for(i: int) -> Entry:
    return Entry(LABELS[i % 2], (i % 100) / 128, 4_000_000_000.0)


def make_l2(path: Path, *, clean: bool = True) -> None:
    """A healthy L2 of N codec values, closed cleanly (marker present) or as
    if its last user had died (marker absent)."""
    codec = ValueCodec(LABELS)
    tier = LmdbTier(config(path))
    tier.put_many_nowait([(k, codec.encode(k, entry_for(i)), 4_000_000_000.0)
                          for i, k in enumerate(keys_for("before", N))])  # fmt: skip
    assert tier.flush(10)
    tier.close_sync()
    if not clean:
        (path / CLEAN_SHUTDOWN_MARKER).unlink()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _open_and_serve(path: str, out: str) -> None:
    """In a child: open L2 the way a gateway does (warm the filter's keys, read
    everything), check what it serves, write to it, and report."""
    records = _Records()
    logging.getLogger().addHandler(records)
    codec = ValueCodec(LABELS)
    tier = LmdbTier(config(path))
    report: dict = {"rebuilt_at_open": tier.counters["rebuilt"]}
    try:
        report["warm"] = sum(1 for _ in tier.iter_keys())
        keys = keys_for("before", N)
        good = bad = 0
        for i, (key, value) in enumerate(zip(keys, tier.get_many_sync(keys))):
            if value is None:
                continue
            try:
                assert codec.decode(key, value, 0.0) == Entry(LABELS[i % 2], (i % 100) / 128, 4_000_000_000.0)
                good += 1
            except BadValue:
                bad += 1
        report.update(good=good, bad=bad)
        new = keys_for("after", 10)
        tier.put_many_nowait([(k, codec.encode(k, entry_for(1)), 4_000_000_000.0) for k in new])
        assert tier.flush(10)
        report["after"] = sum(v is not None for v in tier.get_many_sync(new))
        report["damaged"] = tier.counters["damaged"]
        report["rebuilt"] = tier.counters["rebuilt"]
    finally:
        tier.close_sync()
    report["log"] = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in records.records]
    with open(out, "w") as f:
        json.dump(report, f)


def open_in_child(path: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"report-{random.random()}.json"
    proc = multiprocessing.get_context("spawn").Process(target=_open_and_serve, args=(str(path), str(out)))
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.kill()
        proc.join()
    assert proc.exitcode == 0, f"opening the damaged L2 killed the process (exit code {proc.exitcode})"
    return json.loads(out.read_text())


def assert_moved_aside_and_fresh(path: Path, tmp_path: Path, report: dict, what: str) -> None:
    assert report["rebuilt_at_open"] == report["rebuilt"] == 1, report
    assert report["warm"] == 0 and report["good"] == 0 and report["bad"] == 0, report
    assert report["after"] == 10, report  # it serves: writes land and are read back
    (line,) = report["log"]  # one line, a warning, no traceback
    level, message, traceback = line
    assert level == "WARNING" and not traceback
    assert "damaged" in message and what in message, message
    aside = sorted(path.parent.glob(path.name + ".damaged-*"))
    assert len(aside) == 1 and (aside[0] / "data.mdb").exists(), aside
    assert str(aside[0]) in message
    again = open_in_child(path, tmp_path)  # and the fresh one is healthy from then on
    assert again["rebuilt"] == 0 and again["log"] == [] and again["warm"] == 10, again


@pytest.fixture
def l2(tmp_path) -> Path:
    return tmp_path / "l2"


def test_truncated_file_with_a_clean_marker_is_moved_aside(l2, tmp_path):
    make_l2(l2, clean=True)
    data = l2 / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)  # the marker still says clean: SIGBUS before
    report = open_in_child(l2, tmp_path)
    assert_moved_aside_and_fresh(l2, tmp_path, report, "truncated")


@pytest.mark.parametrize("pages", [(0, 1), (1,)], ids=["both-metas", "second-meta"])
def test_random_meta_pages_are_moved_aside(l2, tmp_path, pages):
    make_l2(l2, clean=True)
    rng = random.Random(7)
    with open(l2 / "data.mdb", "r+b") as f:
        for page in pages:
            f.seek(page * PSIZE)
            f.write(rng.randbytes(PSIZE))
    report = open_in_child(l2, tmp_path)
    assert_moved_aside_and_fresh(l2, tmp_path, report, "meta page")


def test_all_zero_file_is_moved_aside(l2, tmp_path):
    make_l2(l2, clean=True)
    data = l2 / "data.mdb"
    data.write_bytes(bytes(data.stat().st_size))
    report = open_in_child(l2, tmp_path)
    assert_moved_aside_and_fresh(l2, tmp_path, report, "not an LMDB meta page")


def overwrite_data_pages(data: Path, seed: int, count: int = 8) -> None:
    pages = data.stat().st_size // PSIZE
    rng = random.Random(seed)
    with open(data, "r+b") as f:
        for page in rng.sample(range(2, pages), count):
            f.seek(page * PSIZE)
            f.write(rng.randbytes(PSIZE))


@pytest.mark.parametrize("clean", [True, False], ids=["clean-marker", "unclean-stop"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_data_pages_are_moved_aside(l2, tmp_path, seed, clean):
    # Behind a clean marker too: the marker records the file as it was
    # closed, and a file written since is walked before liblmdb maps it here.
    make_l2(l2, clean=clean)
    overwrite_data_pages(l2 / "data.mdb", seed)
    report = open_in_child(l2, tmp_path)
    assert_moved_aside_and_fresh(l2, tmp_path, report, "damaged")


def _damage_while_open(path: str, out: str) -> None:
    """In a child: L2 is damaged on disk while this process has it open (the
    mapping is shared, so it sees the new bytes). It must go on, log one line,
    and record the damage for the next start."""
    records = _Records()
    logging.getLogger().addHandler(records)
    tier = LmdbTier(config(path))
    try:
        data = Path(path) / "data.mdb"
        with open(data, "r+b") as f:  # every page after the metas: each access finds a page of the wrong type
            f.seek(2 * PSIZE)
            f.write(bytes(data.stat().st_size - 2 * PSIZE))
        warm = sum(1 for _ in tier.iter_keys())
        tier.get_many_sync(keys_for("before", N))
        tier.put_many_nowait([(k, b"x" * 30, 4_000_000_000.0) for k in keys_for("after", 10)])
        assert tier.flush(10)
        report = {"warm": warm, "damaged": tier.counters["damaged"]}
    finally:
        tier.close_sync()
    report["log"] = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in records.records]
    with open(out, "w") as f:
        json.dump(report, f)


def test_damage_seen_while_running_is_moved_aside_at_the_next_start(l2, tmp_path):
    make_l2(l2, clean=True)
    out = tmp_path / "report.json"
    proc = multiprocessing.get_context("spawn").Process(target=_damage_while_open, args=(str(l2), str(out)))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0, proc.exitcode
    report = json.loads(out.read_text())
    assert report["damaged"] >= 1 and report["warm"] < N, report
    (line,) = report["log"]
    assert line[0] == "WARNING" and not line[2] and "moved aside at the next start" in line[1], line
    assert (l2 / DAMAGE_MARKER).exists()
    report = open_in_child(l2, tmp_path)
    assert_moved_aside_and_fresh(l2, tmp_path, report, "a process reported")


def test_an_untouched_clean_start_is_not_walked(l2, monkeypatch):
    import cache.l2_recovery as recovery

    make_l2(l2, clean=True)
    walked = []
    monkeypatch.setattr(recovery, "check_walk", lambda path, map_size: walked.append(path))
    LmdbTier(config(l2)).close_sync()
    assert walked == []  # a clean start costs no walk ...
    os.utime(l2 / "data.mdb")  # ... until something touches the file
    LmdbTier(config(l2)).close_sync()
    assert len(walked) == 1


def test_a_lock_file_of_garbage_costs_nothing(l2, tmp_path):
    # lock.mdb holds only the reader table: the first process to open the
    # directory starts it afresh, and the data stays.
    make_l2(l2, clean=True)
    (l2 / "lock.mdb").write_bytes(random.Random(5).randbytes(3 * PSIZE))
    report = open_in_child(l2, tmp_path)
    assert report["rebuilt"] == 0 and report["log"] == [], report
    assert report["warm"] == N + 0 and report["good"] == N and report["after"] == 10


def test_only_the_newest_damaged_copies_are_kept(l2, tmp_path):
    for _ in range(4):
        make_l2(l2, clean=True)
        (l2 / "data.mdb").write_bytes(bytes(4 * PSIZE))
        tier = LmdbTier(config(l2))
        assert tier.counters["rebuilt"] == 1
        tier.close_sync()
    assert len(list(l2.parent.glob(l2.name + ".damaged-*"))) == 2


def test_header_check_accepts_healthy_files(l2):
    assert check_header(str(l2)) is None  # no directory yet
    make_l2(l2, clean=False)
    assert check_header(str(l2)) is None
    data = l2 / "data.mdb"
    os.truncate(data, data.stat().st_size - PSIZE)
    assert "truncated" in check_header(str(l2))
