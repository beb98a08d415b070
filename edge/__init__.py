"""Edge daemon: sources, head runner, link estimator, split policy, gRPC client, spool, sinks."""
