"""``tandem cloud serve``: the tail service from the command line.

Heavy imports (grpc, torch) happen inside the command, so ``tandem --help`` stays quick.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.cli import device_option

if TYPE_CHECKING:
    from tandem.cloud.config import ServeConfig
    from tandem.cloud.server import CloudServer


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cloud serve`` to the ``tandem`` parser."""
    cloud = sub.add_parser("cloud", help="the cloud tail service")
    commands = cloud.add_subparsers(dest="cloud_command", required=True)
    p = commands.add_parser("serve", help="serve every bundle in a model repository over gRPC")
    p.add_argument("--models", required=True, type=Path, help="model repository directory")
    p.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (port 0: any free)")
    p.add_argument(
        "--metrics-listen",
        default="127.0.0.1:9464",
        help="Prometheus HOST:PORT, or 'off'; plain HTTP, so off loopback only with --insecure",
    )
    p.add_argument("--max-batch", type=int, default=32, help="inputs per tail batch, at most")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="longest wait to fill a batch")
    p.add_argument("--max-queue", type=int, default=1024, help="queued inputs before refusing more")
    p.add_argument("--workers", type=int, default=1, help="threads or processes running the tail")
    device_option(
        p,
        "where decoder + tail run: auto (CUDA when PyTorch sees one, else the "
        "CPU; the CPU with --compute processes), cpu, cuda or cuda:N",
    )
    p.add_argument(
        "--compute",
        choices=["threads", "processes"],
        default="threads",
        help="processes keep the forward pass off the server's GIL (faster for small tails)",
    )
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per worker")
    p.add_argument(
        "--max-message-bytes", type=int, default=1 << 20, help="largest gRPC message accepted"
    )
    p.add_argument(
        "--cache-entries", type=int, default=50_000, help="responses kept for retried ids"
    )
    p.add_argument(
        "--cache-max-bytes",
        type=int,
        default=64 << 20,
        help="memory those kept responses may take; the least recently used go first",
    )
    p.add_argument(
        "--max-stream-inflight",
        type=int,
        default=256,
        help="requests one InferStream call may have taken on whose answers the client has "
        "not read (it reports InferRequest.answers_read); a request past them ends the call",
    )
    p.add_argument(
        "--max-streams-per-connection",
        type=int,
        default=100,
        help="concurrent calls on one connection; the server refuses more (UNAVAILABLE, "
        "which clients retry)",
    )
    p.add_argument(
        "--max-connections", type=int, default=1000, help="open connections; more are refused"
    )
    p.add_argument(
        "--idle-timeout-s",
        type=float,
        default=300.0,
        help="close a connection without calls for this long; end a Health.Watch call after "
        "this long (watchers watch again)",
    )
    p.add_argument(
        "--max-connection-age-s",
        type=float,
        default=3600.0,
        help="close a connection this old, its calls given --drain-grace-s to finish",
    )
    p.add_argument(
        "--keepalive-s",
        type=float,
        default=60.0,
        help="ping a connection silent this long; close it if the ping goes unanswered",
    )
    p.add_argument("--poll-s", type=float, default=2.0, help="repository rescan interval")
    p.add_argument(
        "--scan-budget-s", type=float, default=10.0,
        help="a rescan starts no new bundle load after this long; the rest waits for the next",
    )  # fmt: skip
    p.add_argument(
        "--miss-wait-s", type=float, default=5.0,
        help="a request naming an unknown model or version waits this long for a rescan, then "
        "is answered NOT_FOUND",
    )  # fmt: skip
    p.add_argument(
        "--drain-grace-s", type=float, default=30.0,
        help="on SIGTERM, time for calls in flight to finish",
    )  # fmt: skip
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM); needs --tls-key")
    p.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, help="require client certificates (mTLS)")
    p.add_argument("--tokens", type=Path, help="JSON file mapping bearer token -> tenant")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain text off loopback (gRPC without TLS, and the metrics port)",
    )
    p.add_argument("--server-id", help="name reported in responses (default: host-pid)")
    p.add_argument("--json", action="store_true", help="print one JSON line once listening")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the service until SIGTERM/SIGINT, then drain and return 0."""
    import torch

    from tandem.cloud.server import CloudServer

    cfg = serve_config(args)
    torch.set_num_threads(cfg.torch_threads)

    def ready(server: CloudServer) -> None:
        doc = _ready_doc(server)
        if args.json:
            print(json.dumps(doc), flush=True)
        else:
            metrics = f", metrics on {doc['metrics']}" if doc["metrics"] else ""
            print(
                f"serving {len(doc['models'])} model version(s) on {doc['address']} "
                f"({doc['device']}){metrics}",
                flush=True,
            )

    asyncio.run(CloudServer(cfg).run_until_signalled(ready))
    return 0


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The validated settings of a parsed ``cloud serve`` command line."""
    from pydantic import ValidationError

    from tandem.cloud.config import ServeConfig
    from tandem.config import settings_error

    fields = {
        "models": args.models,
        "listen": args.listen,
        "metrics_listen": None if args.metrics_listen == "off" else args.metrics_listen,
        "max_batch": args.max_batch,
        "max_delay_ms": args.max_delay_ms,
        "max_queue": args.max_queue,
        "workers": args.workers,
        "compute": args.compute,
        "torch_threads": args.torch_threads,
        "device": args.device,
        "max_message_bytes": args.max_message_bytes,
        "cache_entries": args.cache_entries,
        "cache_max_bytes": args.cache_max_bytes,
        "max_stream_inflight": args.max_stream_inflight,
        "max_streams_per_connection": args.max_streams_per_connection,
        "max_connections": args.max_connections,
        "idle_timeout_s": args.idle_timeout_s,
        "max_connection_age_s": args.max_connection_age_s,
        "keepalive_s": args.keepalive_s,
        "poll_s": args.poll_s,
        "scan_budget_s": args.scan_budget_s,
        "miss_wait_s": args.miss_wait_s,
        "drain_grace_s": args.drain_grace_s,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "tokens": args.tokens,
        "insecure": args.insecure,
    }
    if args.server_id:
        fields["server_id"] = args.server_id
    try:
        return ServeConfig.model_validate(fields)
    except ValidationError as exc:
        raise settings_error("cloud serve options", exc) from exc


def _ready_doc(server: CloudServer) -> dict[str, Any]:
    from tandem.device import describe

    return {
        "event": "listening",
        "address": server.address,
        "port": server.port,
        "metrics": server.metrics_address,
        "device": describe(server.device),
        "tls": server.cfg.tls,
        "mtls": server.cfg.tls_client_ca is not None,
        "auth": server.tokens.enabled,
        "server_id": server.cfg.server_id,
        "models": [f"{e.name}:{e.version}" for e in server.repo.models()],
    }
