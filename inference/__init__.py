"""The shared-model inference service, its batching, model loading and building.

This package's __init__ imports nothing heavy: the gateway imports
inference.client, and the gateway process must never load torch.
"""

import protos  # noqa: F401  (first: it sets gRPC's experiments before grpc is imported)
