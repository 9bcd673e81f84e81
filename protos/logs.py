"""Log lines of every tiergate process: text or JSON, one line per event.

`configure_logging` is called once per process (the CLI, each gateway worker,
the inference child); the format comes from --log-format, which the CLI also
puts in $TIERGATE_LOG_FORMAT so that the processes it starts log alike. A
traceback stays on its event's line (escaped newlines), so a log shipper
never splits one event into many. Nothing here logs request text: callers
pass counts, codes and reasons.

`Trouble` is for a dependency that can fail for a while (an L2 disk, a Redis):
one WARNING when the failures start, a summary at most every `every_s`
while they go on, and one line when it works again, with how long it failed
and how many times.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

__all__ = ["FORMAT_ENV", "configure_logging", "JsonFormatter", "Trouble"]

FORMAT_ENV = "TIERGATE_LOG_FORMAT"
FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _OneLine(logging.Formatter):
    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        return super().formatException(ei).replace("\n", "\\n")

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return stack_info.replace("\n", "\\n")

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "pid", "msg"[, "exc"]} per line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str, fmt: str | None = None, *, tag: str = "") -> None:
    """`fmt`: text or json (None: $TIERGATE_LOG_FORMAT, else text); `tag`: a
    word the text lines carry after the level, e.g. "worker-1234"."""
    fmt = fmt or os.environ.get(FORMAT_ENV) or "text"
    if fmt not in FORMATS:
        raise ValueError(f"log format must be text or json, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    text = _TEXT.replace("%(name)s", f"{tag} %(name)s") if tag else _TEXT
    handler.setFormatter(JsonFormatter() if fmt == "json" else _OneLine(text))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class Trouble:
    """Start and end of failures of one kind of one dependency (thread-safe)."""

    def __init__(self, logger: logging.Logger, what: str, every_s: float = 60.0,
                 clock=time.monotonic) -> None:
        self._log = logger
        self._what = what
        self._every_s = every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._since: dict[str, float] = {}      # kind -> when its failures started
        self._count: dict[str, int] = {}        # failures since then
        self._told: dict[str, tuple[float, int]] = {}  # kind -> (when, count) of the last line about it

    @property
    def failing(self) -> bool:
        return bool(self._since)  # a plain read: the hot path's "anything to clear?"

    def failed(self, kind: str, exc: BaseException) -> None:
        now = self._clock()
        with self._lock:
            if kind not in self._since:
                self._since[kind], self._count[kind], self._told[kind] = now, 1, (now, 1)
                line = ("%s: %s errors started: %r", self._what, kind, exc)
            else:
                self._count[kind] += 1
                told_at, told_count = self._told[kind]
                if now - told_at < self._every_s:
                    return
                self._told[kind] = (now, self._count[kind])
                line = ("%s: %s errors go on: %d in the last %.0f s, %d in all; the last: %r", self._what, kind,
                        self._count[kind] - told_count, now - told_at, self._count[kind], exc)
        self._log.warning(*line)

    def ok(self, kind: str) -> None:
        if kind not in self._since:
            return
        now = self._clock()
        with self._lock:
            since = self._since.pop(kind, None)
            if since is None:
                return
            count = self._count.pop(kind)
            self._told.pop(kind, None)
        self._log.warning("%s: %s works again after %.1f s (%d errors)", self._what, kind, now - since, count)
