"""Cloud tail service: model repository, batcher, adapters, auth, metrics, gRPC server."""
