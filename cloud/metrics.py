"""Prometheus metrics of the cloud service, exported over HTTP on a port of their own.

Each :class:`ServiceMetrics` owns its registry by default rather than using the global
one, so several servers (in tests, say) can live in one process without name clashes.

Exported series (all prefixed ``tandem_``):

- ``requests_total{method,model,code}``: every request received, refused ones included (an
  unauthenticated call, bytes that do not parse, an unknown model, a full queue...), by its
  final gRPC status code name (``OK`` for an answer). Each request of an ``InferStream`` call
  counts once; a context definition without features is not a request (it gets no answer)
  and is not counted, unless it is refused and ends the stream. ``model`` is the served
  model's name, or "" when the request was refused before it named a loaded model (labels
  stay bounded whatever names clients send);
- ``errors_total{method,model,code}``: the same requests without ``code="OK"``, so
  ``errors_total / requests_total`` is a ratio of one population;
- ``request_seconds{stage}``: latency of each stage: queue, decode, compute, total;
- ``batch_size``: rows per executed batch;
- ``received_bytes_total``: serialized request bytes as received (a compact streamed request
  counts its own bytes, not its context's);
- ``queue_depth``: requests waiting for a batch;
- ``models_loaded``: models ready to serve;
- ``build_info{version,codec_version,python}``: always 1.

Beside them come the standard ``process_*`` (CPU, memory, open files) and ``python_gc_*``
series. No ``*_created`` series are exported: they double the series count and say only
when the process started, which ``process_start_time_seconds`` already does.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)

import tandem
from tandem import codec

# From 0.1 ms (a cached decode) to 10 s (a stuck queue), about three buckets per decade.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("queue", "decode", "compute", "total")


class ServiceMetrics:
    """The service's metrics, in ``registry`` (a fresh one when None)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # A switch of prometheus_client's, for the whole process: it takes effect for the
        # metrics created after it, so it comes first.
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        labels = ["method", "model", "code"]
        self.requests = Counter(
            "tandem_requests", "Requests received, refused ones included.", labels, registry=r
        )
        self.errors = Counter(
            "tandem_errors", "Requests answered with a code other than OK.", labels, registry=r
        )
        Gauge(
            "tandem_build_info",
            "Versions of this server; always 1.",
            ["version", "codec_version", "python"],
            registry=r,
        ).labels(tandem.__version__, str(codec.VERSION), platform.python_version()).set(1)
        self.request_seconds = Histogram(
            "tandem_request_seconds",
            "Seconds spent per request in each stage.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tandem_batch_size", "Rows per executed batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.received_bytes = Counter(
            "tandem_received_bytes", "Request payload bytes received.", registry=r
        )
        self.queue_depth = Gauge("tandem_queue_depth", "Requests waiting for a batch.", registry=r)
        self.models_loaded = Gauge("tandem_models_loaded", "Models ready to serve.", registry=r)
        # Create every stage's series up front: a dashboard sees zeros, not missing data. The
        # children are kept: looking a label up costs more than the observation itself.
        self._stages = {stage: self.request_seconds.labels(stage=stage) for stage in STAGES}
        self._requests: dict[tuple[str, str, str], tuple[Any, Any | None]] = {}

    def observe_request(self, method: str, model: str, code: str) -> None:
        """Count one request of ``method`` that ended with ``code`` (a gRPC status code name,
        "OK" for an answer). ``model`` must be a served model's name or "": labels stay
        bounded only if unknown names a client sends never become one."""
        key = (method, model, code)
        children = self._requests.get(key)
        if children is None:
            failed = self.errors.labels(*key) if code != "OK" else None
            children = self._requests[key] = (self.requests.labels(*key), failed)
        counted, failed = children
        counted.inc()
        if failed is not None:
            failed.inc()

    def observe_stages(self, queue_s: float, decode_s: float, compute_s: float) -> None:
        """Record the queue, decode and compute seconds of one request."""
        self._stages["queue"].observe(queue_s)
        self._stages["decode"].observe(decode_s)
        self._stages["compute"].observe(compute_s)

    def observe_total(self, seconds: float) -> None:
        """Record the end-to-end seconds of one request."""
        self._stages["total"].observe(seconds)

    def observe_batch(self, size: int) -> None:
        """Record the size of one executed batch."""
        self.batch_size.observe(size)

    def add_bytes(self, n: int) -> None:
        """Count ``n`` received payload bytes."""
        self.received_bytes.inc(n)

    def set_queue_depth(self, n: int) -> None:
        """Set the number of requests waiting for a batch."""
        self.queue_depth.set(n)

    def set_models_loaded(self, n: int) -> None:
        """Set the number of models ready to serve."""
        self.models_loaded.set(n)

    def text(self) -> str:
        """The metrics in Prometheus' text exposition format."""
        return generate_latest(self.registry).decode("utf-8")

    def serve(self, host: str, port: int) -> tuple[int, Callable[[], None]]:
        """Export the metrics over HTTP on ``host:port`` (0: any free port), in a thread.

        Returns the bound port and a function that stops the server, closes its socket
        and joins its thread (calling it again does nothing).
        """
        httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        stopped = False

        def stop() -> None:
            nonlocal stopped
            if stopped:
                return
            stopped = True
            httpd.shutdown()  # returns once serve_forever has left its loop
            httpd.server_close()
            thread.join()

        return int(httpd.server_port), stop
