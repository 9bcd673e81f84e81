"""Generated protobuf and gRPC code for protos/*.proto (see scripts/gen_protos.py)."""
