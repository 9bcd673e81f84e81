"""The output of `tiergate classify`: never half-written under its final name.

Rows go to `OUT.partial` next to OUT; after each write a small record,
`OUT.partial.json`, says how many rows and bytes of it are complete (written
after the data, by rename, so it never claims more than the file holds). The
finished file is synced and renamed to OUT, and the record removed. An
interrupted run leaves both behind, and `--resume` cuts the partial file back
to what the record vouches for and carries on after that many rows.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time

__all__ = ["OutputFile", "ResumeError"]

_VERSION = 1
_RECORD_EVERY_S = 0.25


class ResumeError(ValueError):
    """--resume cannot continue this partial output (the message says why and what to do)."""


class OutputFile:
    def __init__(self, path: str, job: dict) -> None:
        """`job`: what must match for a resume (input identity, column, format)."""
        self.path = path
        self.to_stdout = path == "-"
        self.partial = path + ".partial"
        self.record = path + ".partial.json"
        self._job = job
        self._file = None
        self.rows = 0      # rows complete in the file
        self.errors = 0    # of them, rows with an error value
        self.bytes = 0
        self._recorded_at = 0.0
        self.replaced_partial = False  # start() cut back the partial file of an earlier, interrupted run

    def start(self, header: bytes, resume: bool) -> int:
        """Open for writing; the number of input rows already done (resume) or 0."""
        if self.to_stdout:
            if resume:
                raise ResumeError("--resume needs an output file (-o OUT), not stdout")
            self._file = sys.stdout.buffer
            self._file.write(header)
            return 0
        if resume and os.path.exists(self.partial):
            self._file = self._open_locked()
            try:
                return self._reopen(len(header))
            except BaseException:
                self._file.close()
                self._file = None
                raise
        if resume and os.path.exists(self.path):
            raise ResumeError(f"{self.path} is already complete; nothing to resume (run without --resume to redo it)")
        self.replaced_partial = os.path.exists(self.partial)
        self._file = self._open_locked()
        self._file.truncate(0)
        self._write(header, 0)
        self.checkpoint()
        return 0

    def _open_locked(self):
        """The partial file, opened for writing and locked: two jobs writing
        the same output would interleave their rows."""
        f = os.fdopen(os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o666), "r+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise ValueError(f"another tiergate classify is writing {self.path} ({self.partial} is locked)") from None
        return f

    def _reopen(self, header_bytes: int) -> int:
        try:
            with open(self.record, encoding="utf-8") as f:
                record = json.load(f)
            rows, size, errors = int(record["rows"]), int(record["bytes"]), int(record["errors"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ResumeError(f"{self.partial} has no readable progress record ({self.record}); "
                              "run without --resume to start over") from None
        if record.get("version") != _VERSION or record.get("job") != self._job:
            raise ResumeError(f"{self.partial} was written for another input, column or format "
                              "(or the input changed since); run without --resume to start over")
        if os.path.getsize(self.partial) < size:
            raise ResumeError(f"{self.partial} is shorter than its progress record says; "
                              "run without --resume to start over")
        self._file.seek(max(0, size - 1))
        if rows < 0 or errors < 0 or size < header_bytes or (size > 0 and self._file.read(1) != b"\n"):
            raise ResumeError(f"the progress record {self.record} does not match {self.partial}; "
                              "run without --resume to start over")
        self._file.truncate(size)  # whatever was written after the last record is redone
        self._file.seek(size)
        self.rows, self.bytes, self.errors = rows, size, errors
        return rows

    def _write(self, data: bytes, rows: int, errors: int = 0) -> None:
        self._file.write(data)
        self._file.flush()
        self.rows += rows
        self.errors += errors
        self.bytes += len(data)
        now = time.monotonic()
        if now - self._recorded_at >= _RECORD_EVERY_S:
            self.checkpoint()

    def write(self, data: bytes, rows: int, errors: int) -> None:
        """Append `rows` complete rows rendered as `data`, `errors` of them with an error value."""
        self._write(data, rows, errors)

    def checkpoint(self) -> None:
        """Make the progress record say what is written now (also done every
        _RECORD_EVERY_S by write(): a killed run redoes at most that much)."""
        self._recorded_at = time.monotonic()
        if self.to_stdout or self._file is None:
            return
        tmp = self.record + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"version": _VERSION, "job": self._job, "rows": self.rows, "errors": self.errors,
                       "bytes": self.bytes}, f)
        os.replace(tmp, self.record)

    def finish(self) -> None:
        """Everything is written: make it the output, under its final name."""
        if self.to_stdout:
            self._file.flush()
            return
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial, self.path)
        os.unlink(self.record)

    def discard(self) -> None:
        """Stopped before any row was written: leave nothing behind."""
        if self._file is not None and not self.to_stdout:
            self._file.close()
            for path in (self.partial, self.record):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def keep(self) -> None:
        """Stopped before the end: leave the partial file and its record for --resume."""
        if self._file is not None and not self.to_stdout:
            self.checkpoint()
            self._file.close()
