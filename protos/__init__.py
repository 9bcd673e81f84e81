"""Generated protobuf and gRPC code for protos/*.proto (see scripts/gen_protos.py).

Importing this package also picks gRPC's connection code for every tiergate
process, which must happen before grpc itself is first imported (grpc reads
GRPC_EXPERIMENTS at import): gateway/ and inference/ import this package
first. grpcio 1.85 moves the sockets of servers and channels to its newer
EventEngine, whose worker threads add a thread hop to every read and write;
with the older code (the two experiments turned off below) a unary call woke
10 threads instead of 18 and cost the gateway 10-20% less CPU at 224 calls/s
on 2 cores, and an L1 hit took p50 0.41-0.50 ms instead of 0.48-0.63.
A GRPC_EXPERIMENTS set by the user is left as it is.
"""

import os

GRPC_EXPERIMENTS = "-event_engine_listener,-event_engine_client"

os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
