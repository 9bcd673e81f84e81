"""The one place that maps exceptions to gRPC status codes.

Callers get a status and a message they can act on; internal exception text
and stack traces stay in the gateway's log.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from inference.client import InferenceRejected, InferenceUnavailable

__all__ = ["InvalidInput", "Overloaded", "status_for", "abort_with"]

log = logging.getLogger(__name__)


class InvalidInput(ValueError):
    """The request itself is wrong; the message says what and what to do."""


class Overloaded(Exception):
    """The gateway is at its limit of in-flight work; retry with backoff."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, InferenceUnavailable):
        return grpc.StatusCode.UNAVAILABLE, (
            "the inference service is unavailable, so texts that are not cached cannot be scored now "
            "(cached texts are still served); retry with backoff"
        )
    if isinstance(exc, InferenceRejected):
        if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return exc.code, "the model is saturated; retry with backoff"
        if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return exc.code, "deadline exceeded before the model could score the text"
        if exc.code == grpc.StatusCode.UNAVAILABLE:
            return exc.code, "the inference service is unavailable; retry with backoff"
        log.error("inference service answered %s: %s", exc.code.name, exc)
        return grpc.StatusCode.INTERNAL, "the model failed to score the text"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    log.error("unexpected error while classifying", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error in the gateway (logged)"


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message = status_for(exc)
    await context.abort(code, message)
