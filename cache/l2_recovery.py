"""Opening the L2 LMDB directory safely across processes and crashes.

Every gateway process on a host opens the same directory. The first one to
open it checks it, and rebuilds it empty, if the last one to use it did not
close it cleanly; the last one to close it writes the clean-shutdown marker.
Two flock files arrange this: the open lock serializes opening and closing,
and every process with the environment open holds the users lock shared, so
whoever gets it exclusive is alone.

    use = EnvUse(path)              # claims the path in this process
    env = use.open(map_size)        # checks/rebuilds if needed; use.rebuilt
    ...
    env.close()
    use.release(clean=True)         # the last one out writes the marker
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading

import lmdb

try:
    from lmdb.verify import verify as _verify  # py-lmdb >= 3: checks a file without mapping it
except ImportError:  # pragma: no cover
    _verify = None

__all__ = ["CLEAN_SHUTDOWN_MARKER", "EnvUse", "check_unclean"]

# L2's messages stay under the L2 tier's logger name.
log = logging.getLogger(__name__)

CLEAN_SHUTDOWN_MARKER = "clean-shutdown"
_OPEN_LOCK_FILE = "tiergate-open.lock"  # serializes opening/closing across processes
_USERS_LOCK_FILE = "tiergate-users.lock"  # every process with the env open holds it shared


def _unlink(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


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
        self.rebuilt = False  # whether open() found the directory damaged and emptied it
        self._users_fd: int | None = None
        with _open_paths_lock:
            if path in _open_paths:
                raise RuntimeError(f"L2 directory {path} is already open in this process")
            _open_paths.add(path)

    def open(self, map_size: int) -> lmdb.Environment:
        """Open the environment, checking it first if the last process to use
        it did not close it cleanly (only when no other process has it open)."""
        os.makedirs(self.path, exist_ok=True)
        open_fd = os.open(os.path.join(self.path, _OPEN_LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(open_fd, fcntl.LOCK_EX)
            self._users_fd = os.open(os.path.join(self.path, _USERS_LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                first = True
            except BlockingIOError:
                first = False  # others have it open: it was checked when the first of them opened it
            marker = os.path.join(self.path, CLEAN_SHUTDOWN_MARKER)
            if first:
                if not os.path.exists(marker):
                    problem = check_unclean(self.path, map_size)
                    if problem is not None:
                        log.warning("L2 at %s was not shut down cleanly and is damaged (%s): rebuilding it empty",
                                    self.path, problem)  # fmt: skip
                        _unlink(os.path.join(self.path, "data.mdb"), os.path.join(self.path, "lock.mdb"))
                        self.rebuilt = True
                # The marker is absent while any process has the env open, so a
                # crash from here on is recognized at the next open.
                _unlink(marker)
            env = lmdb.open(
                self.path,
                map_size=map_size,
                max_dbs=2,
                sync=False,  # a cache: the writer thread syncs every sync_interval_s
                lock=True,
                readahead=False,  # random reads of a large map: readahead only wastes page cache
            )
            if first:
                env.reader_check()  # clear reader slots of dead processes, which pin old pages
            fcntl.flock(self._users_fd, fcntl.LOCK_SH)  # the first one downgrades: others may open now
            return env
        finally:
            os.close(open_fd)  # closing the descriptor releases the open lock

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
        open_fd = os.open(os.path.join(self.path, _OPEN_LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(open_fd, fcntl.LOCK_EX)
            fcntl.flock(self._users_fd, fcntl.LOCK_UN)
            try:
                fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except BlockingIOError:
                last = False
            if last and write_marker:
                with open(os.path.join(self.path, CLEAN_SHUTDOWN_MARKER), "w") as f:
                    f.write("closed cleanly; absent while open or after a crash\n")
        finally:
            os.close(self._users_fd)
            self._users_fd = None
            os.close(open_fd)


def check_unclean(path: str, map_size: int) -> str | None:
    """Why the data file left by an unclean stop is unsafe to open, or None.

    A truncated data file makes LMDB die with SIGBUS when it touches a page
    past the end, so this never hands a page to liblmdb before checking:
    sizes first, then lmdb.verify (a pure-Python walker, py-lmdb >= 3),
    else a full cursor scan, which is safe once the sizes add up.
    """
    data = os.path.join(path, "data.mdb")
    try:
        size = os.path.getsize(data)
    except FileNotFoundError:
        return None
    if size == 0:
        return None  # LMDB initializes an empty file like a new one
    psize = os.sysconf("SC_PAGE_SIZE")  # LMDB's page size on this host
    if size < 2 * psize:
        return f"data.mdb is {size} bytes, shorter than its two meta pages"
    try:
        env = lmdb.open(path, map_size=map_size, max_dbs=2, readonly=True, lock=False)
    except lmdb.Error as exc:
        return f"cannot open: {exc}"
    try:
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        if size < needed:
            return f"data.mdb is {size} bytes, its pages need {needed}"
        if _verify is None:  # py-lmdb < 3: walk every B-tree through liblmdb
            try:
                with env.begin(buffers=True) as txn:
                    for name in (b"entries", b"age"):
                        if txn.get(name) is not None:
                            for _item in txn.cursor(db=env.open_db(name, txn=txn, create=False)):
                                pass
            except lmdb.Error as exc:
                return f"scan failed: {exc}"
            return None
    finally:
        env.close()
    try:
        problems = _verify(path)
    except Exception as exc:  # VerifyError, OSError, or a walker bug
        return f"verify failed: {exc}"
    return f"verify: {problems[0]}" if problems else None
