"""tiergate's one exception tree, and the one place that maps it to gRPC status.

Every error a caller can see is a TiergateError whose class decides the gRPC
status code and whose message is safe to show (it names what went wrong and
what to do, never internal text). The gateway, the inference service, the
cache and the clients all raise these; anything else that escapes is a bug,
logged with its traceback and answered INTERNAL without details.

It lives beside the protos because it is part of the contract between the
processes: the inference service sends these codes in band, per text, and the
gateway turns them back into the same classes.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc

__all__ = [
    "TiergateError", "InvalidInput", "Overloaded", "Unavailable", "Lost", "DeadlineExceeded", "Unauthenticated",
    "ModelFailed", "Cancelled", "status_for", "error_for_code", "abort_with", "RateLimitedLog",
]  # fmt: skip

log = logging.getLogger(__name__)


class TiergateError(Exception):
    """Base of every error a caller may see. `code` is its gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(TiergateError):
    """The request itself is wrong; the message says what and what to do."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Overloaded(TiergateError):
    """At a limit of in-flight work (gateway or model); retry with backoff."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(TiergateError):
    """No inference service can take the text now, or the server is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class Lost(Unavailable):
    """The connection to the inference service broke while it held the text:
    it may be sent again to another replica."""


class DeadlineExceeded(TiergateError):
    """The caller's deadline passed before an answer was ready."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(TiergateError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ModelFailed(TiergateError):
    """The model raised while scoring (details are in the inference service's log)."""

    code = grpc.StatusCode.INTERNAL


class Cancelled(TiergateError):
    """Nobody waits for the text any more (the only caller went away)."""

    code = grpc.StatusCode.CANCELLED


_BY_CODE = {cls.code: cls for cls in (InvalidInput, Overloaded, Unavailable, DeadlineExceeded, Unauthenticated,
                                      ModelFailed, Cancelled)}
_CODES = {c.value[0]: c for c in grpc.StatusCode}


def error_for_code(code: int | grpc.StatusCode, message: str) -> TiergateError:
    """The TiergateError for a status code received from another tiergate process."""
    if isinstance(code, int):
        code = _CODES.get(code, grpc.StatusCode.UNKNOWN)
    cls = _BY_CODE.get(code, ModelFailed)
    return cls(message or f"{code.name.lower()} from the inference service")


class RateLimitedLog:
    """Logs at most one record per `interval_s` per kind, with how many were suppressed.

    A client that sends junk in a loop must not turn every call into a logged
    traceback (disk, CPU and the real errors drowned).
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._log = logger
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, kind: str, level: int, msg: str, *args, exc_info=None) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -1e18) < self._interval:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            msg += f" ({suppressed} more like it in the last {self._interval:.0f} s not logged)"
        self._log.log(level, msg, *args, exc_info=exc_info)


_unexpected = RateLimitedLog(log)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message a caller may see) for any exception."""
    if isinstance(exc, TiergateError):
        return exc.code, exc.message
    if isinstance(exc, (TimeoutError,)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    _unexpected("unexpected", logging.ERROR, "unexpected error while serving a call", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error (logged by the server)"


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message = status_for(exc)
    await context.abort(code, message)
