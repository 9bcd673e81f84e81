"""grpc.health.v1.Health for every tiergate server, hardened against junk.

grpcio-health-checking's servicer is registered with generated deserializers:
a request that does not parse is answered UNKNOWN with the exception's class
in the message, and its traceback is logged on every call. This one takes
bytes, parses them itself and answers INVALID_ARGUMENT with a plain message.
Same methods as that servicer (set, enter_graceful_shutdown), so the servers
drive it the same way.
"""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

__all__ = ["HealthService", "HEALTH_SERVICE"]

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN_SERVICE = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
_JUNK = "the request is not a grpc.health.v1.HealthCheckRequest"


class HealthService:
    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self._shutting_down = False

    def status(self, service: str = "") -> int | None:
        return self._status.get(service)

    async def set(self, service: str, status: int) -> None:
        if self._shutting_down:
            return  # once shutting down, stays NOT_SERVING
        async with self._changed:
            self._status[service] = status
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        async with self._changed:
            self._shutting_down = True
            for service in self._status:
                self._status[service] = _NOT_SERVING
            self._changed.notify_all()

    @staticmethod
    async def _parse(data: bytes, context) -> str:
        try:
            return health_pb2.HealthCheckRequest.FromString(data).service
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _JUNK)

    async def check(self, data: bytes, context) -> bytes:
        service = await self._parse(data, context)
        status = self._status.get(service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {service!r}")
        return health_pb2.HealthCheckResponse(status=status).SerializeToString()

    async def watch(self, data: bytes, context):
        service = await self._parse(data, context)
        last = None
        while True:
            status = self._status.get(service, _UNKNOWN_SERVICE)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status).SerializeToString()
                last = status
            if self._shutting_down and self._status.get(service, _UNKNOWN_SERVICE) == last:
                # NOT_SERVING is said and final: end the stream, so that an open
                # watch does not hold the server's shutdown for its whole grace period.
                return
            async with self._changed:
                await self._changed.wait_for(
                    lambda: self._shutting_down or self._status.get(service, _UNKNOWN_SERVICE) != last)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        # No (de)serializers: the handlers take and return bytes.
        return grpc.method_handlers_generic_handler(HEALTH_SERVICE, {
            "Check": grpc.unary_unary_rpc_method_handler(self.check),
            "Watch": grpc.unary_stream_rpc_method_handler(self.watch),
        })
