"""The gate in front of the gateway's handlers that closes when the drain period ends.

Once closed, a call that still reaches this server (one that raced the
closing port, or came on a connection that has not yet seen GOAWAY) is
answered UNAVAILABLE with a message a user can act on, instead of whatever
a half-stopped server would say. Health stays open so pollers keep reading
NOT_SERVING. While open the gate costs one method call per RPC.
"""

from __future__ import annotations

import grpc

from protos.errors import Unavailable, abort_with

__all__ = ["ClosingGate", "SHUTTING_DOWN"]

SHUTTING_DOWN = "the gateway is shutting down; retry on another instance"

_HEALTH_PREFIX = "/grpc.health.v1.Health/"


async def _refuse(request_iterator, context: grpc.aio.ServicerContext) -> None:
    # A stream handler for every method: it answers without waiting for a
    # request message, whatever the method's shape on the client side.
    await abort_with(context, Unavailable(SHUTTING_DOWN))


_REFUSE = grpc.stream_stream_rpc_method_handler(_refuse)


class ClosingGate(grpc.GenericRpcHandler):
    """Registered before every other handler of the server."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def service(self, handler_call_details):
        if self.closed and not handler_call_details.method.startswith(_HEALTH_PREFIX):
            return _REFUSE
        return None  # open: the next handler serves it
