"""Generated gRPC and protobuf stubs for proto/tandem/v1 (in ``v1/``; see proto/generate.py)."""
