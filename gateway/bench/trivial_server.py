"""The cheapest grpc.aio server that answers Classify: the Python anchor of
`tiergate bench --compare`.

    python -m gateway.bench.trivial_server [--host 127.0.0.1] [--port 0]

One process, one generic handler for /tiergate.v1.Classifier/Classify with
identity (de)serializers: the request bytes are never parsed and the answer
is one ClassifyResponse serialized once at start. Whatever tiergate's hit path
costs beyond this is tiergate's own; what this costs is grpc.aio's.
Prints "... listening on HOST:PORT" when ready; SIGINT/SIGTERM stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

from protos import classifier_pb2

__all__ = ["main", "RESPONSE"]

# The same fields a gateway hit carries, so the reply is the same size on the wire.
RESPONSE = classifier_pb2.ClassifyResponse(label="positive", score=0.9, tier=classifier_pb2.TIER_L1,
                                           model="trivial@000000000000").SerializeToString()


async def _classify(request: bytes, context) -> bytes:
    return RESPONSE


async def serve(host: str, port: int) -> None:
    # No serializers given: grpc passes bytes through untouched in both directions.
    handler = grpc.method_handlers_generic_handler(
        "tiergate.v1.Classifier", {"Classify": grpc.unary_unary_rpc_method_handler(_classify)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"trivial_server: cannot listen on {host}:{port}")
    await server.start()
    print(f"trivial grpc.aio server listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gateway.bench.trivial_server", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (default)")
    args = p.parse_args(argv)
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
