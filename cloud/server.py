"""The cloud tail service: a ``grpc.aio`` server around :class:`SplitInferenceService`.

Besides ``tandem.v1.SplitInference`` it speaks ``grpc.health.v1`` and server reflection, v1
and v1alpha (so ``grpcurl`` can list and call it), exports Prometheus metrics on a separate
port, rescans its model repository on a timer, reloads its tokens file on SIGHUP and drains
on SIGTERM: it stops accepting calls, finishes those in flight, and exits 0.

Every peer, with a token or without, is bounded: in connections, in calls per connection,
in idle time and in connection age (see :func:`grpc_options`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tandem.address import format_address, parse_address
from tandem.cloud import reflection
from tandem.cloud.auth import AuthInterceptor, TokenStore
from tandem.cloud.batcher import Batcher
from tandem.cloud.compute import make_compute
from tandem.cloud.config import ServeConfig
from tandem.cloud.health import BoundedHealth
from tandem.cloud.metrics import ServiceMetrics
from tandem.cloud.repository import ModelRepository
from tandem.cloud.service import SERVICE_NAME, SplitInferenceService, handlers
from tandem.device import CPU, DeviceError, resolve_device
from tandem.tls import server_credentials

log = logging.getLogger(__name__)

#: How long a keepalive ping may go unanswered before the connection is closed.
KEEPALIVE_TIMEOUT_S = 20.0


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def grpc_options(cfg: ServeConfig) -> list[tuple[str, int]]:
    """grpc server options enforcing the message size and the per-peer limits of ``cfg``.

    Streams past ``max_streams_per_connection`` wait for a free one (HTTP/2's
    SETTINGS_MAX_CONCURRENT_STREAMS); connections past ``max_connections`` are closed as
    they arrive. A connection without calls for ``idle_timeout_s`` is closed; so is any
    connection ``max_connection_age_s`` old, its calls given ``drain_grace_s`` to finish: that
    is what ends a stream held open and silent, authenticated or not (Health.Watch needs no
    token). Keepalive pings find peers that vanished without closing.
    """
    return [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", cfg.max_streams_per_connection),
        ("grpc.max_allowed_incoming_connections", cfg.max_connections),
        ("grpc.max_connection_idle_ms", _ms(cfg.idle_timeout_s)),
        ("grpc.max_connection_age_ms", _ms(cfg.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", _ms(cfg.drain_grace_s)),
        ("grpc.keepalive_time_ms", _ms(cfg.keepalive_s)),
        ("grpc.keepalive_timeout_ms", _ms(KEEPALIVE_TIMEOUT_S)),
    ]


def serving_device(cfg: ServeConfig) -> torch.device:
    """Where decoder + tail run: ``cfg.device`` resolved. Worker processes run on the CPU, so
    with ``compute=processes`` ``auto`` is the CPU and a CUDA device is refused (one line)."""
    if cfg.compute == "processes" and cfg.device == "auto":
        return CPU
    device = resolve_device(cfg.device)
    if cfg.compute == "processes" and device.type != "cpu":
        raise DeviceError(
            f"--compute processes runs the tail in CPU worker processes, not on {cfg.device}: "
            "serve on the GPU with --compute threads"
        )
    return device


class CloudServer:
    """One running service. ``await start()``, then ``await drain()`` to stop it."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.device = serving_device(cfg)  # first: a wrong device fails before anything loads
        self.tokens = TokenStore(cfg.tokens)
        self.repo = ModelRepository(cfg.models, cfg.scan_budget_s, self.device)
        self.metrics = ServiceMetrics()
        # Repository scans read files: one thread of their own keeps them off the loop.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="scan")
        self.compute = make_compute(cfg.compute, cfg.workers, cfg.torch_threads)
        self.port = 0
        self.metrics_port: int | None = None
        self._stop_metrics: Callable[[], None] | None = None
        self._scan_lock: asyncio.Lock | None = None
        self._last_scan = 0.0
        self._poller: asyncio.Task[None] | None = None
        self._server: grpc.aio.Server | None = None
        self._health = BoundedHealth(watch_s=cfg.idle_timeout_s)

    @property
    def address(self) -> str:
        """``host:port`` the service listens on (the real port when 0 was asked for)."""
        return format_address(parse_address(self.cfg.listen)[0], self.port)

    @property
    def metrics_address(self) -> str | None:
        """``host:port`` of the metrics endpoint, or None when metrics are off."""
        if self.cfg.metrics_listen is None or self.metrics_port is None:
            return None
        return format_address(parse_address(self.cfg.metrics_listen)[0], self.metrics_port)

    async def start(self) -> None:
        """Load the repository, bind the ports, and start answering."""
        self.tokens.load()
        self._scan_lock = asyncio.Lock()
        await self.rescan(force=True)
        self.batcher = Batcher(
            self.compute.run,
            workers=self.cfg.workers,
            max_batch=self.cfg.max_batch,
            max_delay_s=self.cfg.max_delay_ms / 1000,
            max_queue=self.cfg.max_queue,
            ahead=self.compute.ahead,
            on_batch=self.metrics.observe_batch,
        )
        self.service = SplitInferenceService(
            self.cfg, self.repo, self.batcher, self.metrics, self.tokens, self.rescan
        )
        # Metrics first: a taken port then fails the start before anything answers.
        if self.cfg.metrics_listen is not None:
            host, port = parse_address(self.cfg.metrics_listen)
            try:
                self.metrics_port, self._stop_metrics = self.metrics.serve(host, port)
            except OSError as exc:
                self._release()
                raise OSError(f"cannot serve metrics on {self.cfg.metrics_listen}: {exc}") from exc
        server = grpc.aio.server(
            interceptors=[AuthInterceptor(self.tokens, on_refused=self._count_refused)],
            options=grpc_options(self.cfg),
        )
        server.add_generic_rpc_handlers((handlers(self.service),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable([SERVICE_NAME, health.SERVICE_NAME], server)
        try:
            self.port = self._bind(server)
        except BaseException:
            self._release()
            raise
        self._server = server
        await server.start()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._poller = asyncio.create_task(self._poll())
        log.info("serving %d model(s) on %s", len(self.repo.models()), self.address)

    def _count_refused(self, method: str) -> None:
        """Count a call the token check refused, under its method's short name."""
        name = method.rsplit("/", 1)[-1]
        self.metrics.observe_request(name, "", grpc.StatusCode.UNAUTHENTICATED.name)

    def _bind(self, server: grpc.aio.Server) -> int:
        if self.cfg.tls_cert is not None and self.cfg.tls_key is not None:
            creds = server_credentials(self.cfg.tls_cert, self.cfg.tls_key, self.cfg.tls_client_ca)
            return self._add_port(lambda: server.add_secure_port(self.cfg.listen, creds))
        return self._add_port(lambda: server.add_insecure_port(self.cfg.listen))

    def _add_port(self, add: Callable[[], int]) -> int:
        message = f"cannot listen on {self.cfg.listen}: in use or not available"
        try:
            port = add()
        except RuntimeError as exc:  # grpc's "Failed to bind"
            raise OSError(message) from exc
        if port == 0:
            raise OSError(message)
        return port

    async def rescan(self, force: bool = False) -> None:
        """Rescan the repository in a worker thread; unless forced, at most every miss_rescan_s.

        The limit keeps a stream of requests for unknown models from turning into a stream
        of directory scans.
        """
        assert self._scan_lock is not None
        async with self._scan_lock:
            loop = asyncio.get_running_loop()
            if not force and loop.time() - self._last_scan < self.cfg.miss_rescan_s:
                return
            count = await loop.run_in_executor(self.executor, self.repo.scan)
            self._last_scan = loop.time()
        self.metrics.set_models_loaded(count)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.poll_s)
            try:
                await self.rescan(force=True)
            except Exception:  # a scan must never kill the poller
                log.exception("repository scan failed")

    def reload_tokens(self) -> bool:
        """Re-read the tokens file (SIGHUP); on error the old tokens stay."""
        return self.tokens.reload()

    async def drain(self) -> None:
        """Refuse new calls, finish the ones in flight, then release everything."""
        if self._server is None:
            return
        self.service.draining = True
        await self._health.enter_graceful_shutdown()
        if self._poller:
            self._poller.cancel()
        await self._server.stop(self.cfg.drain_grace_s)
        await self.batcher.close()
        self._release()
        self._server = None
        log.info("drained")

    def _release(self) -> None:
        if self._stop_metrics:
            self._stop_metrics()
            self._stop_metrics = None
        self.compute.close()
        self.executor.shutdown(wait=True)

    async def run_until_signalled(self, on_ready: Callable[[CloudServer], None]) -> None:
        """Start, report readiness, then serve until SIGTERM or SIGINT (SIGHUP reloads tokens)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_tokens)
        await self.start()
        on_ready(self)
        await stop.wait()
        log.info("signal received: draining")
        await self.drain()
