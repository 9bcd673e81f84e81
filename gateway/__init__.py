"""The tiergate gateway: gRPC handlers, the CLI, workers and the bench."""

import protos  # noqa: F401  (first: it sets gRPC's experiments before grpc is imported)
