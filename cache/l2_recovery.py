"""Opening the L2 LMDB directory safely across processes, crashes and damage.

Every gateway process on a host opens the same directory. The first one to
open it (nobody else has it open) checks it; whatever damage it finds, it
moves the data file aside and starts empty, with one warning: L2 is a cache,
and no state of its files may stop the service or crash it. The last one to
close it writes the clean-shutdown marker, unless one of the others died with
it open: each process leaves a record file while it has the environment open,
so a record without its process means a crash, and a crash (liblmdb may abort
a process on a damaged page) means the next first opener checks everything.
Two flock files arrange the rest: the open lock serializes opening and
closing, and every process with the environment open holds the users lock
shared, so whoever gets it exclusive is alone.

The checks, cheapest first:
- always: both meta pages, read with pread (never through an mmap), must be
  LMDB meta pages that agree, and the file must be as long as the pages they
  claim. liblmdb maps the file and dies with SIGBUS on a page past its end,
  so a truncated file must never reach it, whatever the marker says.
- a process saw liblmdb report corruption while it ran (the damage marker):
  damaged, no more checks needed.
- unless the marker says the last user closed it cleanly AND the file is
  untouched since (the marker records its inode, size, mtime and ctime,
  which any write, truncation or utime changes): every B-tree is walked
  through liblmdb in a short-lived child process, so a page that crashes
  liblmdb (SIGBUS, SIGSEGV, an assertion's abort) crashes the child, which
  reads as "damaged". Damage done while no process had the file open shows
  no other way, and liblmdb can abort a gateway that reads a garbled page.
  The walk costs 55 ms for a small L2, about 3.5 s for a full 512 MiB one
  here; an untouched clean start costs a few system calls.
- then liblmdb opens it; an error there is damage too.

    use = EnvUse(path)                        # claims the path in this process
    env, dbs = use.open(map_size, names)      # checks, moves aside if needed; use.rebuilt
    ...
    use.mark_damaged(why)                     # liblmdb reported corruption at run time
    env.close()
    use.release(clean=True)                   # the last one out writes the marker

Files are private: the directory is created 0700 and every file in it 0600
(answers may reveal what users sent).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from typing import Sequence

import lmdb

__all__ = ["CLEAN_SHUTDOWN_MARKER", "CORRUPTION", "DAMAGE_MARKER", "EnvUse", "check_header", "check_walk"]

# L2's messages stay under the L2 tier's logger name.
log = logging.getLogger("cache.l2_lmdb")

CLEAN_SHUTDOWN_MARKER = "clean-shutdown"
DAMAGE_MARKER = "tiergate-damaged"  # written when liblmdb reported corruption at run time
_OPEN_LOCK_FILE = "tiergate-open.lock"  # serializes opening/closing across processes
_USERS_LOCK_FILE = "tiergate-users.lock"  # every process with the env open holds it shared
_USER_RECORD = "tiergate-user-"  # + pid and a token: one per process with the env open
_DATA, _LOCK = "data.mdb", "lock.mdb"
_KEEP_DAMAGED = 2  # moved-aside copies kept next to the directory, for a post-mortem
_WALK_TIMEOUT_S = 300.0
_FILE_MODE, _DIR_MODE = 0o600, 0o700

# What liblmdb raises when the data file itself is broken. BadTxnError: a
# transaction that liblmdb flagged as failed inside one call, which here only
# a page it could not use does (our transactions end at their first error).
CORRUPTION = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError,
              lmdb.VersionMismatchError, lmdb.PanicError, lmdb.BadTxnError)  # fmt: skip

# What says nothing about the file: the host is short of memory, disk or reader slots.
_NOT_DAMAGE = (lmdb.MemoryError, lmdb.DiskError, lmdb.ReadersFullError, lmdb.LockError)

# LMDB 0.9 on a 64-bit host (lmdb/mdb.c): a 16-byte page header (mp_pgno u64,
# mp_pad u16, mp_flags u16, mp_lower u16, mp_upper u16), then MDB_meta:
# mm_magic u32, mm_version u32, mm_address u64, mm_mapsize u64, two MDB_db
# records of 48 bytes (md_pad u32 -- the page size in the first --, md_flags
# u16, md_depth u16, four u64 counters, md_root u64), mm_last_pg u64, mm_txnid u64.
_META = struct.Struct("=QHHHH" "IIQQ" "IHHQQQQQ" "IHHQQQQQ" "QQ")
_MAGIC = 0xBEEFC0DE
_DATA_VERSION = 1
_P_META = 0x08
_P_INVALID = 2**64 - 1
_NUM_METAS = 2


def _unlink(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _private_fd(path: str) -> int:
    """Open (creating) a file of ours, read-write and mode 0600 whatever the umask."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    _tighten(path, fd)
    return fd


def _tighten(path: str, fd: int | None = None) -> None:
    try:
        st = os.fstat(fd) if fd is not None else os.stat(path)
        if stat.S_IMODE(st.st_mode) != _FILE_MODE:
            if fd is not None:
                os.fchmod(fd, _FILE_MODE)
            else:
                os.chmod(path, _FILE_MODE)
    except FileNotFoundError:
        pass
    except OSError as exc:  # someone else's file: say so, do not fail
        log.warning("L2 file %s could not be made private (mode 0600): %s", path, exc.strerror)


# Directories already warned about, so a wide directory is reported once per process.
_warned_dirs: set[str] = set()


def _prepare_dir(path: str) -> None:
    """Create the directory 0700; an existing one open to others is not ours
    to change (it may be a directory the operator shares on purpose): warn."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        os.mkdir(path, _DIR_MODE)
    except FileExistsError:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077 and path not in _warned_dirs:
            _warned_dirs.add(path)
            log.warning("L2 directory %s is accessible to other users (mode %o); the cache files in it are 0600, "
                        "but chmod 700 it to hide them", path, mode)  # fmt: skip
    else:
        os.chmod(path, _DIR_MODE)  # exactly 0700, whatever the umask


# LMDB must not be opened twice in one process (its fcntl locks are per
# process and file: closing one handle releases the other's), so refuse it.
_open_paths: set[str] = set()
_open_paths_lock = threading.Lock()


class EnvUse:
    """This process's use of one L2 directory, from claiming it to release.

    Creating one claims the (absolute) path in this process and raises
    RuntimeError if it is already claimed. Call `open` once, then `release`
    exactly once, after closing the environment, whether `open` succeeded or
    not."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.rebuilt = False  # whether open() found the directory damaged and started it empty
        self._users_fd: int | None = None
        self._record = self._file(f"{_USER_RECORD}{os.getpid()}-{os.urandom(4).hex()}")
        self._marked_damaged = False
        with _open_paths_lock:
            if path in _open_paths:
                raise RuntimeError(f"L2 directory {path} is already open in this process")
            _open_paths.add(path)

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def open(self, map_size: int, names: Sequence[bytes]) -> tuple[lmdb.Environment, list]:
        """Open the environment and its named databases, first checking it and
        moving it aside if it is damaged (only when no other process has it
        open: then nobody can be using the pages in question)."""
        _prepare_dir(self.path)
        open_fd = _private_fd(self._file(_OPEN_LOCK_FILE))
        try:
            fcntl.flock(open_fd, fcntl.LOCK_EX)
            self._users_fd = _private_fd(self._file(_USERS_LOCK_FILE))
            try:
                fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                first = True
            except BlockingIOError:
                first = False  # others have it open: it was checked when the first of them opened it
            if first:
                problem = self._check(map_size)
                if problem is not None:
                    self._move_aside(problem)
                # The marker is absent while any process has the env open, so a
                # crash from here on is recognized at the next open. lock.mdb
                # holds only the reader table, whose every slot is a dead
                # process's now: start it afresh, whatever state it is in.
                _unlink(self._file(CLEAN_SHUTDOWN_MARKER), self._file(DAMAGE_MARKER), self._file(_LOCK),
                        *self._other_records())  # fmt: skip
            try:
                env, dbs = self._open_env(map_size, names)
            except _NOT_DAMAGE:
                raise
            except lmdb.Error as exc:
                if not first:
                    raise
                self._move_aside(f"LMDB cannot open it: {exc}")
                env, dbs = self._open_env(map_size, names)  # empty now: an error here is not damage
            for name in (_DATA, _LOCK):
                _tighten(self._file(name))  # files left by an older version may be 0644
            os.close(os.open(self._record, os.O_WRONLY | os.O_CREAT, _FILE_MODE))
            fcntl.flock(self._users_fd, fcntl.LOCK_SH)  # the first one downgrades: others may open now
            return env, dbs
        finally:
            os.close(open_fd)  # closing the descriptor releases the open lock

    def _open_env(self, map_size: int, names: Sequence[bytes]) -> tuple[lmdb.Environment, list]:
        env = lmdb.open(
            self.path,
            map_size=map_size,
            max_dbs=len(names),
            sync=False,  # a cache: the writer thread syncs every sync_interval_s
            lock=True,
            readahead=False,  # random reads of a large map: readahead only wastes page cache
            mode=_FILE_MODE,
        )
        try:
            dbs = [env.open_db(name) for name in names]
            with env.begin() as txn:
                for db in dbs:
                    txn.stat(db)
            return env, dbs
        except BaseException:
            env.close()
            raise

    def _check(self, map_size: int) -> str | None:
        """Why the directory must not be opened as it is, or None."""
        try:
            with open(self._file(DAMAGE_MARKER), encoding="utf-8", errors="replace") as f:
                return f"a process reported {f.read(500).strip() or 'corruption'}"
        except FileNotFoundError:
            pass
        problem = check_header(self.path)
        if problem is None and not self._untouched_since_clean_close():
            problem = check_walk(self.path, map_size)
        return problem

    def _data_stamp(self) -> str:
        st = os.stat(self._file(_DATA))
        return f"{st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"

    def _untouched_since_clean_close(self) -> bool:
        try:
            with open(self._file(CLEAN_SHUTDOWN_MARKER), encoding="utf-8", errors="replace") as f:
                recorded = f.read(500).splitlines()[-1:]
            return recorded == [self._data_stamp()]
        except FileNotFoundError:  # no marker (a crash), or no data file (nothing to walk)
            return False

    def _move_aside(self, problem: str) -> None:
        """Move data.mdb out of the way (to <path>.damaged-<time>/, keeping the
        newest few such copies) and log the one line that says so."""
        data = self._file(_DATA)
        dest = f"{self.path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 0
        while os.path.lexists(dest + (f"-{n}" if n else "")):
            n += 1
        dest += f"-{n}" if n else ""
        try:
            os.mkdir(dest, _DIR_MODE)
            try:
                os.replace(data, os.path.join(dest, _DATA))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.rmdir(dest)
                raise
            done = f"moved its data file to {dest}"
            self._prune_damaged()
        except FileNotFoundError:
            done = "no data file to keep"
        except OSError as exc:
            _unlink(data)
            done = f"deleted its data file (moving it aside failed: {exc.strerror})"
        _unlink(self._file(_LOCK), self._file(DAMAGE_MARKER))
        log.warning("L2 at %s is damaged (%s): %s; starting empty", self.path, problem, done)
        self.rebuilt = True

    def _prune_damaged(self) -> None:
        copies = sorted(glob.glob(glob.escape(self.path) + ".damaged-*"), key=os.path.getmtime)
        for old in copies[:-_KEEP_DAMAGED]:
            shutil.rmtree(old, ignore_errors=True)

    def mark_damaged(self, problem: str) -> None:
        """Record that liblmdb reported corruption while this process used the
        environment, so that the next first opener moves it aside."""
        if self._marked_damaged:
            return
        self._marked_damaged = True
        try:
            fd = os.open(self._file(DAMAGE_MARKER), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(problem[:500] + "\n")
        except OSError as exc:
            log.warning("L2 at %s: could not record the damage for the next start: %s", self.path, exc.strerror)

    def release(self, *, clean: bool) -> None:
        """Leave the set of users (the last one out writes the clean marker if
        `clean`), then unclaim the path in this process."""
        self._release_users_lock(write_marker=clean)
        with _open_paths_lock:
            _open_paths.discard(self.path)

    def _release_users_lock(self, write_marker: bool) -> None:
        """Leave the set of users; the last one out writes the clean marker."""
        if self._users_fd is None:
            return
        open_fd = _private_fd(self._file(_OPEN_LOCK_FILE))
        try:
            fcntl.flock(open_fd, fcntl.LOCK_EX)
            fcntl.flock(self._users_fd, fcntl.LOCK_UN)
            try:
                fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except BlockingIOError:
                last = False
            _unlink(self._record)
            if last:
                crashed = self._other_records()  # users that never got here: they died with it open
                _unlink(*crashed)
                write_marker = write_marker and not crashed
            if last and write_marker:
                fd = os.open(self._file(CLEAN_SHUTDOWN_MARKER), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
                with os.fdopen(fd, "w") as f:
                    f.write("closed cleanly; absent while open or after a crash. data.mdb then (inode size "
                            f"mtime ctime):\n{self._data_stamp()}\n")
        finally:
            os.close(self._users_fd)
            self._users_fd = None
            os.close(open_fd)


    def _other_records(self) -> list[str]:
        return [p for p in glob.glob(glob.escape(self._file(_USER_RECORD)) + "*") if p != self._record]


def check_header(path: str) -> str | None:
    """Why data.mdb's meta pages say it is unsafe to map, or None.

    Reads the two meta pages with pread, the way mdb_env_read_header does, and
    checks that the file holds every page they claim (mm_last_pg) and that
    their roots lie within those pages. Microseconds: it runs on every start.
    """
    data = os.path.join(path, _DATA)
    try:
        fd = os.open(data, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return None  # LMDB initializes an empty file like a new one
        metas = []
        psize = 0
        for i in range(_NUM_METAS):
            raw = os.pread(fd, _META.size, i * psize)
            if len(raw) < _META.size:
                return f"data.mdb is {size} bytes, too short for meta page {i}"
            (_pgno, _pad, flags, _lower, _upper, magic, version, _address, _mapsize,
             m_psize, _f1, _f2, _f3, _f4, _f5, _f6, free_root,
             _m0, _m1, _m2, _m3, _m4, _m5, _m6, main_root, last_pg, _txnid) = _META.unpack(raw)  # fmt: skip
            if not flags & _P_META or magic != _MAGIC:
                return f"page {i} of data.mdb is not an LMDB meta page"
            if version != _DATA_VERSION:
                return f"meta page {i} has data version {version}, this LMDB reads {_DATA_VERSION}"
            if i == 0:
                psize = m_psize
                if psize & (psize - 1) or not 512 <= psize <= 0x8000:
                    return f"meta page 0 claims an impossible page size {psize}"
            elif m_psize != psize:
                return f"the meta pages disagree on the page size ({psize} vs {m_psize})"
            metas.append((free_root, main_root, last_pg))
        for i, (free_root, main_root, last_pg) in enumerate(metas):
            if last_pg < _NUM_METAS - 1 or last_pg > size:  # last_pg > size: the product below would be absurd
                return f"meta page {i} claims {last_pg} as its last page"
            needed = (last_pg + 1) * psize
            if size < needed:
                return f"data.mdb is {size} bytes but meta page {i} says its pages need {needed} (truncated)"
            for root in (free_root, main_root):
                if root != _P_INVALID and not _NUM_METAS <= root <= last_pg:
                    return f"meta page {i} has a root page {root} outside pages 2..{last_pg}"
        return None
    finally:
        os.close(fd)


# Runs in a child process: walks every named database through liblmdb and
# compares what it found with the counts LMDB keeps. Imports nothing but lmdb,
# so it works whatever state the importing package is in.
_WALK = r"""
import sys
import lmdb
path, map_size = sys.argv[1], int(sys.argv[2])
try:
    env = lmdb.open(path, map_size=map_size, max_dbs=16, readonly=True, lock=False)
    with env.begin(buffers=True) as txn:
        names = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
        for name in names:
            db = env.open_db(name, txn=txn, create=False)
            walked = sum(1 for _ in txn.cursor(db=db).iternext(keys=True, values=False))
            counted = txn.stat(db)["entries"]
            if walked != counted:
                print(f"database {name!r} holds {walked} entries, its header says {counted}")
                sys.exit(1)
except lmdb.Error as exc:
    print(f"{type(exc).__name__}: {exc}")
    sys.exit(1)
"""


def check_walk(path: str, map_size: int, timeout_s: float = _WALK_TIMEOUT_S) -> str | None:
    """Why walking the data file through liblmdb fails, or None. Runs the walk
    in a child process: on a damaged file liblmdb may crash (SIGBUS, SIGSEGV,
    an assertion), and then the child dies, not this process."""
    if not os.path.exists(os.path.join(path, _DATA)):
        return None
    try:
        done = subprocess.run([sys.executable, "-P", "-c", _WALK, path, str(map_size)],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"walking it took more than {timeout_s:.0f} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        return f"reading it crashed the check ({name})"
    lines = (done.stdout or done.stderr).decode(errors="replace").strip().splitlines()
    return lines[-1][:300] if lines else f"the check exited with {done.returncode}"
