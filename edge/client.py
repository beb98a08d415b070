"""The edge side of the wire: a ``grpc.aio`` client with retries.

A request is retried with exponential backoff and full jitter when the answer is
UNAVAILABLE (server down, restarting or draining) or DEADLINE_EXCEEDED (the answer may have
been lost), or RESOURCE_EXHAUSTED because the server's queue was full.
Retrying is safe because the request keeps its ``request_id``: the server answers a repeated
id from its cache, so a request is never computed twice for the client.
Every other status is final, and raised at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from tandem.tls import channel_credentials
from tandem.wire.v1 import split_inference_pb2 as pb
from tandem.wire.v1 import split_inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
OVERLOADED = grpc.StatusCode.RESOURCE_EXHAUSTED
QUEUE_FULL = "queue full"
"""RESOURCE_EXHAUSTED with these words (the server's full queue) clears; a message too large
never fits, and is final."""


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff ``initial_s * multiplier**attempt`` capped at ``max_s``, full jitter.

    ``max_attempts`` None retries for as long as ``give_up_after_s`` allows (None: forever).
    """

    initial_s: float = 0.05
    max_s: float = 2.0
    multiplier: float = 2.0
    attempt_timeout_s: float = 10.0
    max_attempts: int | None = None
    give_up_after_s: float | None = None

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        # The exponent is capped: past it the delay is max_s anyway, and a float power of
        # an outage's thousandth attempt would overflow.
        growth = self.multiplier ** min(attempt, 64)
        return rng.uniform(0, min(self.max_s, self.initial_s * growth))


@dataclass(frozen=True)
class ClientSecurity:
    """How the client proves who it is: TLS trust roots, an mTLS key pair, a bearer token."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token: str | None = None
    tls: bool = False


@dataclass(frozen=True)
class Answer:
    """A response, how many attempts it took, how long the successful one took, and the
    bytes of the message that carried the request (protobuf, without HTTP/2 framing)."""

    response: pb.InferResponse
    attempts: int
    last_attempt_s: float
    sent_bytes: int


class Sender(Protocol):
    """How the daemon sends requests: a unary call each (:class:`CloudClient`) or one
    multiplexed stream (:class:`tandem.edge.stream.StreamClient`). Either retries transient
    failures under its retry policy and raises ``grpc.aio.AioRpcError`` for a final status,
    or for the last transient one when the policy gives up."""

    async def infer(self, request: pb.InferRequest) -> Answer:
        """The answer to ``request``."""
        ...

    async def close(self) -> None:
        """Close the connection."""
        ...


class CloudClient:
    """One channel to the cloud service."""

    def __init__(
        self,
        target: str,
        *,
        security: ClientSecurity | None = None,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = 1 << 20,
        seed: int | None = None,
        on_retry: Callable[[grpc.StatusCode], None] | None = None,
    ) -> None:
        security = security or ClientSecurity()
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # Reconnect quickly after a server restart rather than grpc's default backoff.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if security.tls or security.ca or security.cert:
            creds = channel_credentials(security.ca, security.cert, security.key)
            self.channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = pb_grpc.SplitInferenceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {security.token}"),) if security.token else ()
        """What every call sends along: the bearer token, when there is one."""
        self.retry = retry or RetryPolicy()
        self.max_message_bytes = max_message_bytes
        self.rng = random.Random(seed)
        self.on_retry = on_retry
        self.last_transient: grpc.aio.AioRpcError | None = None
        """The latest transient failure (for reports: ``on_retry`` gets only its code)."""

    async def infer(self, request: pb.InferRequest) -> Answer:
        """Send one request, retrying transient failures under the retry policy.

        Raises:
            grpc.aio.AioRpcError: a final status, or the last transient one when the
                policy gives up.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempt = 0
        while True:
            sent = loop.time()
            try:
                response = await self.stub.Infer(
                    request, timeout=self.retry.attempt_timeout_s, metadata=self.metadata
                )
                return Answer(response, attempt + 1, loop.time() - sent, request.ByteSize())
            except grpc.aio.AioRpcError as exc:
                if not self.transient(exc) or self.exhausted(attempt, loop.time() - started):
                    raise
                self.last_transient = exc
                if self.on_retry:
                    self.on_retry(exc.code())
                await asyncio.sleep(self.retry.delay(attempt, self.rng))
                attempt += 1

    @staticmethod
    def transient(exc: grpc.aio.AioRpcError) -> bool:
        """Whether ``exc`` may clear on its own, so that the request is worth retrying."""
        return exc.code() in RETRYABLE or (
            exc.code() == OVERLOADED and QUEUE_FULL in (exc.details() or "")
        )

    def exhausted(self, attempt: int, elapsed: float) -> bool:
        """Whether the policy gives up after attempt number ``attempt`` (0-based) failed,
        ``elapsed`` seconds after the first was sent."""
        r = self.retry
        if r.max_attempts is not None and attempt + 1 >= r.max_attempts:
            return True
        return r.give_up_after_s is not None and elapsed >= r.give_up_after_s

    async def server_info(self, timeout: float = 10.0) -> pb.ServerInfo:
        """The service's limits and identity."""
        return await self.stub.GetServerInfo(
            pb.ServerInfoRequest(), timeout=timeout, metadata=self.metadata
        )

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def __aenter__(self) -> CloudClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
