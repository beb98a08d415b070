"""The cloud service's settings, validated before anything starts."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tandem.address import parse_address
from tandem.config import StrictModel
from tandem.tls import is_loopback


class ServeConfig(StrictModel):
    """Everything ``tandem cloud serve`` takes."""

    models: Path = Field(description="model repository: one bundle per subdirectory")
    listen: str = "127.0.0.1:50051"
    metrics_listen: str | None = Field("127.0.0.1:9464", description="None turns metrics off")
    max_batch: int = Field(32, ge=1, le=4096)
    max_delay_ms: float = Field(2.0, ge=0, le=10_000)
    max_queue: int = Field(1024, ge=1)
    workers: int = Field(1, ge=1, le=256, description="threads or processes running the tail")
    compute: Literal["threads", "processes"] = Field(
        "threads", description="run batches in worker threads or in worker processes"
    )
    torch_threads: int = Field(1, ge=1, le=256, description="torch threads per worker")
    device: str = Field(
        "auto", description="where decoder + tail run: auto, cpu, cuda or cuda:N (worker "
        "processes run on the CPU, so with compute=processes auto is the CPU)"
    )  # fmt: skip
    max_message_bytes: int = Field(1 << 20, ge=1024, le=1 << 30)
    cache_entries: int = Field(50_000, ge=0, description="responses kept for retried ids")
    cache_max_bytes: int = Field(
        64 << 20, ge=0, description="bytes the kept responses may take; the oldest go first"
    )
    poll_s: float = Field(2.0, gt=0, description="how often the repository is rescanned")
    miss_rescan_s: float = Field(
        0.2, ge=0, description="a request for an unknown model rescans at most this often"
    )
    scan_budget_s: float = Field(
        10.0,
        gt=0,
        description="a repository scan starts no new load after this long (each scan loads "
        "at least one); the rest waits for the next scan",
    )
    miss_wait_s: float = Field(
        5.0,
        ge=0,
        description="how long a request for an unknown model or version waits for that rescan "
        "before it is answered NOT_FOUND (a slow scan runs on)",
    )
    drain_grace_s: float = Field(30.0, ge=0)
    max_stream_inflight: int = Field(
        256,
        ge=1,
        le=1 << 20,
        description="requests one InferStream may have taken on whose answers its client has "
        "not read (InferRequest.answers_read)",
    )
    max_streams_per_connection: int = Field(
        100, ge=1, description="concurrent calls on one connection; more are refused"
    )
    max_connections: int = Field(1000, ge=1, description="open connections; more are refused")
    idle_timeout_s: float = Field(
        300.0,
        gt=0,
        description="a connection without calls for this long is closed, and a Health.Watch "
        "call ends after this long (watchers watch again)",
    )
    max_connection_age_s: float = Field(
        3600.0,
        gt=0,
        description="a connection this old is closed, its calls given drain_grace_s to finish "
        "(so no stream, not even an unauthenticated Health.Watch, is held forever)",
    )
    keepalive_s: float = Field(
        60.0, gt=0, description="ping a connection silent this long; close it if no answer"
    )
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = Field(None, description="require client certificates (mTLS)")
    tokens: Path | None = Field(None, description="JSON file: bearer token -> tenant")
    insecure: bool = Field(False, description="allow plain text on a non-loopback address")
    server_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        """TLS files go together, and plain text stays on loopback unless insecure is set."""
        host, _ = parse_address(self.listen)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if self.tls_cert is None:
            self._plain_text_allowed(host, "plain text", "give --tls-cert/--tls-key")
        if self.metrics_listen is not None:
            # The metrics endpoint is always plain HTTP, whatever the gRPC port uses.
            metrics_host, _ = parse_address(self.metrics_listen)
            self._plain_text_allowed(
                metrics_host, "plain-HTTP metrics", "give a loopback --metrics-listen"
            )
        return self

    def _plain_text_allowed(self, host: str, what: str, remedy: str) -> None:
        """The one rule for every unencrypted port: loopback only, unless insecure is set."""
        if not self.insecure and not is_loopback(host):
            raise ValueError(f"refusing {what} on {host}: {remedy}, or --insecure")

    @property
    def tls(self) -> bool:
        """Whether the service listens with TLS."""
        return self.tls_cert is not None
