"""The ``SplitInference`` servicer: validation, batching, caching, answers.

Every failure becomes a gRPC status from the error model (see the README), raised here as a
:class:`RequestError` and never as a crash. Checks run cheapest first and before any work is
queued: the model and adapter are resolved, the width and the tensor header are checked
against the bundle, and only then is the payload queued for decoding in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

import tandem
from tandem import codec, entropy_codec
from tandem.adapters import Adapter
from tandem.cloud.auth import TokenStore, authenticated_tenant, can_use, tenant_of
from tandem.cloud.batcher import (
    Batcher,
    BatcherClosedError,
    DeadlinePassedError,
    Done,
    QueueFullError,
)
from tandem.cloud.compute import ComputeFailedError
from tandem.cloud.config import ServeConfig
from tandem.cloud.errors import RequestError
from tandem.cloud.idempotency import ResponseCache, ReusedIdError
from tandem.cloud.inference import BadFeatures, Scores, Target
from tandem.cloud.metrics import ServiceMetrics
from tandem.cloud.repository import ModelEntry, ModelRepository, NotFoundError
from tandem.cloud.stream_contexts import DefinitionError, StreamContexts
from tandem.cloud.stream_window import StreamWindow
from tandem.protocol import from_message
from tandem.stream_ids import MAX_REQUEST_ID
from tandem.wire.v1 import split_inference_pb2 as pb
from tandem.wire.v1 import split_inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SplitInference"].full_name


@contextlib.contextmanager
def _concerning(model: str) -> Iterator[None]:
    """Label a :class:`RequestError` raised inside with the served ``model``."""
    try:
        yield
    except RequestError as exc:
        exc.model = model
        raise


@dataclass(frozen=True)
class Unparsed:
    """Stands in for a message whose bytes did not parse, so the handler can answer it."""

    error: str


def tolerant(message: type[Any]) -> Callable[[bytes], Any]:
    """A request deserializer that returns :class:`Unparsed` instead of raising.

    grpc answers a deserializer's exception with UNKNOWN and logs a traceback per call;
    bad bytes are the client's mistake, so they get INVALID_ARGUMENT and no log flood.
    """

    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError as exc:
            return Unparsed(f"request does not parse as {message.DESCRIPTOR.full_name}: {exc}")

    return parse


def _parsed(request: Any) -> None:
    if isinstance(request, Unparsed):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, request.error)


class SplitInferenceService(pb_grpc.SplitInferenceServicer):
    """Answers ``tandem.v1.SplitInference`` from a model repository."""

    def __init__(
        self,
        cfg: ServeConfig,
        repo: ModelRepository,
        batcher: Batcher,
        metrics: ServiceMetrics,
        tokens: TokenStore,
        rescan: Callable[[], Awaitable[None]],
    ) -> None:
        self.cfg, self.repo, self.batcher = cfg, repo, batcher
        self.metrics, self.tokens, self._rescan = metrics, tokens, rescan
        # Answers are kept serialized: their bytes are what the byte bound counts, where a
        # parsed message takes several times its serialized size.
        self.cache: ResponseCache[bytes] = ResponseCache(
            cfg.cache_entries, cfg.cache_max_bytes, len
        )
        self.draining = False

    # ------------------------------------------------------------------ RPCs

    async def Infer(
        self, request: pb.InferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.InferResponse:
        """One request, one answer, or the request's status code."""
        if not isinstance(request, Unparsed):
            self.metrics.add_bytes(request.ByteSize())
        try:
            return await self._guarded(request, context, "Infer")
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
            raise  # abort raises; this only satisfies the type checker

    async def InferStream(
        self,
        request_iterator: AsyncIterator[pb.InferRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.StreamResult]:
        """Pipelined requests; answers in completion order, each failure on its own.

        The stream's window (:mod:`tandem.cloud.stream_window`) is checked as each request
        is read. A request that breaks it is not taken on: reading stops, the answers of the
        requests already taken on are sent, and then the stream ends with the window's status.
        A context definition the stream cannot keep (:mod:`tandem.cloud.stream_contexts`)
        ends it the same way.
        """
        window = StreamWindow(self.cfg.max_stream_inflight)
        contexts = StreamContexts()
        results: asyncio.Queue[pb.StreamResult | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()
        refused: list[RequestError] = []

        async def one(
            item: pb.InferRequest | Unparsed | RequestError, out: pb.StreamResult
        ) -> None:
            try:
                if isinstance(item, RequestError):  # its context failed: it fails alone
                    self.metrics.observe_request("InferStream", "", item.code.name)
                    raise item
                out.response.CopyFrom(await self._guarded(item, context, "InferStream"))
            except RequestError as exc:
                out.error.CopyFrom(pb.Status(code=exc.code.value[0], message=exc.message))
            results.put_nowait(out)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    item, out = self._stream_item(request, contexts)
                    if item is None:  # a context's definition alone: no answer, no place
                        continue
                    if isinstance(item, DefinitionError):  # a protocol error: the stream ends
                        self.metrics.observe_request("InferStream", "", item.code.name)
                        refused.append(item)
                        break
                    try:
                        # An unparsed request reports nothing read; it still takes a place.
                        read_so_far = 0 if isinstance(request, Unparsed) else request.answers_read
                        window.take(read_so_far)
                    except RequestError as exc:
                        self.metrics.observe_request("InferStream", "", exc.code.name)
                        refused.append(exc)
                        break
                    task = asyncio.create_task(one(item, out))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                await asyncio.gather(*list(tasks))
            finally:
                results.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await results.get()) is not None:
                window.sent += 1  # counted before the client can have read it
                yield item
            await reader
        finally:
            for task in [reader, *tasks]:
                task.cancel()
        if refused:
            await context.abort(refused[0].code, refused[0].message)

    def _stream_item(
        self, request: pb.InferRequest | Unparsed, contexts: StreamContexts
    ) -> tuple[pb.InferRequest | Unparsed | RequestError | None, pb.StreamResult]:
        """What to serve for one streamed message (None: nothing, it only defined a context),
        and its answer's envelope, echoing the ids the client sent."""
        if isinstance(request, Unparsed):
            return request, pb.StreamResult()
        self.metrics.add_bytes(request.ByteSize())  # as received, before any context
        out = pb.StreamResult(request_id=request.request_id, seq=request.seq)
        try:
            return contexts.resolve(request), out
        except RequestError as exc:
            return exc, out

    async def _guarded(
        self,
        request: pb.InferRequest | Unparsed,
        context: grpc.aio.ServicerContext[Any, Any],
        method: str,
    ) -> pb.InferResponse:
        """Answer one request; every failure, expected or not, leaves as a RequestError.

        Every request is counted once, under the code it ends with.
        """
        try:
            _parsed(request)
            assert isinstance(request, pb.InferRequest)
            response = await self._answer(request, self._tenant(context), context, method)
        except RequestError as exc:
            self.metrics.observe_request(method, exc.model, exc.code.name)
            raise
        except asyncio.CancelledError:  # the client went away, or the server is stopping
            self.metrics.observe_request(method, "", grpc.StatusCode.CANCELLED.name)
            raise
        except Exception as exc:
            log.exception("request failed unexpectedly")
            self.metrics.observe_request(method, "", grpc.StatusCode.INTERNAL.name)
            raise RequestError(grpc.StatusCode.INTERNAL, "internal error") from exc
        self.metrics.observe_request(method, response.model, grpc.StatusCode.OK.name)
        return response

    def _tenant(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """The caller's tenant, checked per request: a token revoked by SIGHUP stops working
        at once, on streams opened before the reload too."""
        tenant = authenticated_tenant(context, self.tokens)
        if tenant is None:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
        return tenant

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        """Every loaded bundle version."""
        await self._admit_listing(request, context, "ListModels")
        return pb.ListModelsResponse(models=[_model_info(e) for e in self.repo.models()])

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListAdaptersResponse:
        """The adapters the caller's tenant may use: its own and the shared ones."""
        await self._admit_listing(request, context, "ListAdapters")
        tenant = tenant_of(context, self.tokens)
        infos = [
            pb.AdapterInfo(
                model=e.name,
                model_version=e.version,
                name=a.name,
                version=a.version,
                tenant=a.tenant,
            )
            for e in self.repo.models()
            if not request.model or e.name == request.model
            for versions in e.adapters.values()
            for a in versions.values()
            if can_use(tenant, a.tenant)
        ]
        return pb.ListAdaptersResponse(adapters=infos)

    async def GetServerInfo(
        self, request: pb.ServerInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerInfo:
        """Limits and identity of this server, and who the caller is."""
        await self._admit_listing(request, context, "GetServerInfo")
        return pb.ServerInfo(
            server_id=self.cfg.server_id,
            tandem_version=tandem.__version__,
            codec_version=codec.VERSION,
            max_batch=self.cfg.max_batch,
            max_delay_ms=self.cfg.max_delay_ms,
            max_queue=self.cfg.max_queue,
            max_message_bytes=self.cfg.max_message_bytes,
            max_stream_inflight=self.cfg.max_stream_inflight,
            tenant=tenant_of(context, self.tokens),
        )

    async def _admit_listing(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> None:
        """Count a listing call, and refuse it with INVALID_ARGUMENT if it did not parse."""
        failed = isinstance(request, Unparsed)
        code = grpc.StatusCode.INVALID_ARGUMENT if failed else grpc.StatusCode.OK
        self.metrics.observe_request(method, "", code.name)
        if failed:
            await context.abort(code, request.error)

    # ------------------------------------------------------------------ the request path

    async def _answer(
        self,
        request: pb.InferRequest,
        tenant: str,
        context: grpc.aio.ServicerContext[Any, Any],
        method: str,
    ) -> pb.InferResponse:
        start = time.perf_counter()
        entry, deadline = await self._admit(request, context.time_remaining())
        with _concerning(entry.name):
            target = await self._target(entry, request, tenant, deadline)

            async def run() -> bytes:
                return (await self._compute(request, target)).SerializeToString()

            key = (tenant, request.request_id)
            try:
                answer, cached = await self.cache.get_or_run(
                    key, _fingerprint(request, target), run
                )
            except ReusedIdError as exc:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        self.metrics.observe_total(time.perf_counter() - start)
        response = pb.InferResponse.FromString(answer)
        response.cached = cached
        return response

    async def _admit(
        self, request: pb.InferRequest, remaining: float | None
    ) -> tuple[ModelEntry, float | None]:
        """The checks that need no model, then the model the request names, and the
        request's deadline (``time.monotonic()``), if any."""
        if self.draining:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is draining")
        if not 0 < len(request.request_id) <= MAX_REQUEST_ID:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"request_id needs 1..{MAX_REQUEST_ID} chars"
            )
        deadline = _deadline(remaining, request.deadline_ms)
        return await self._resolve(request.model, request.version), deadline

    async def _target(
        self, entry: ModelEntry, request: pb.InferRequest, tenant: str, deadline: float | None
    ) -> Target:
        """What the request asks of ``entry``, checked: adapter, width and features."""
        adapter = await self._adapter(entry, request, tenant)
        width = entry.trained_width(request.width)
        if width is None:
            widths = entry.manifest.bottleneck.widths
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"width {request.width:g} not trained; choose from {widths}",
            )
        payload = _checked_payload(request, entry, width)
        return Target(entry, adapter, width, payload, deadline)

    async def _resolve(self, name: str, version: str) -> ModelEntry:
        try:
            return self.repo.resolve(name, version)
        except NotFoundError:
            await self._rescan_briefly()  # perhaps it was dropped in since the last scan
        try:
            return self.repo.resolve(name, version)
        except NotFoundError as exc:
            raise RequestError(grpc.StatusCode.NOT_FOUND, str(exc)) from exc

    async def _rescan_briefly(self) -> None:
        """Rescan for a request that named something unknown, waiting at most miss_wait_s.

        A slow scan (a big bundle loading, a slow disk) must not hold a NOT_FOUND back until
        the request's deadline; the scan itself runs on, and serves the next request.
        """
        scan = asyncio.ensure_future(self._rescan())
        scan.add_done_callback(lambda t: t.cancelled() or t.exception())  # never unretrieved
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(scan), self.cfg.miss_wait_s)

    async def _adapter(
        self, entry: ModelEntry, request: pb.InferRequest, tenant: str
    ) -> Adapter | None:
        if not request.adapter:
            if request.adapter_version:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, "adapter_version without adapter"
                )
            return None

        def usable(a: Adapter) -> bool:
            return can_use(tenant, a.tenant)

        name, version = request.adapter, request.adapter_version
        try:
            adapter = entry.adapter(name, version, usable)
        except NotFoundError:
            await self._rescan_briefly()
            try:
                adapter = self.repo.resolve(entry.name, entry.version).adapter(
                    name, version, usable
                )
            except NotFoundError as exc:
                raise RequestError(grpc.StatusCode.NOT_FOUND, str(exc)) from exc
        if not can_use(tenant, adapter.tenant):
            raise RequestError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"adapter {adapter.name!r} belongs to another tenant",
            )
        return adapter

    async def _compute(self, request: pb.InferRequest, target: Target) -> pb.InferResponse:
        # No adapter in the key: requests naming different adapters (or none) share a batch,
        # and each row gets its own adapter's terms (cloud/lora_batch.py).
        key = (target.entry.name, target.entry.version, target.width)
        try:
            future = self.batcher.submit(key, target, target.deadline)
        except QueueFullError as exc:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        except BatcherClosedError as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        self.metrics.set_queue_depth(self.batcher.queued)
        try:
            done: Done = await future
        except DeadlinePassedError as exc:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from exc
        except (ComputeFailedError, BatcherClosedError) as exc:  # the client retries these
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        value, decode_s, compute_s = done.value
        if isinstance(value, BadFeatures):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"bad features: {value}")
        self.metrics.observe_stages(done.queue_s, decode_s, compute_s)
        return self._response(request, target, value, done, decode_s, compute_s)

    def _response(
        self,
        request: pb.InferRequest,
        target: Target,
        scores: Scores,
        done: Done,
        decode_s: float,
        compute_s: float,
    ) -> pb.InferResponse:
        labels = target.entry.manifest.input.labels
        best = scores.order[: max(request.top_k, 1)].tolist()
        probs = scores.probs
        return pb.InferResponse(
            request_id=request.request_id,
            top=[pb.ClassScore(index=i, label=labels[i], score=float(probs[i])) for i in best],
            logits=scores.logits.tolist() if request.return_logits else [],
            served_by=self.cfg.server_id,
            model=target.entry.name,
            model_version=target.entry.version,
            adapter=target.adapter.name if target.adapter else "",
            adapter_version=target.adapter.version if target.adapter else "",
            timings=pb.Timings(
                queue_us=int(done.queue_s * 1e6),
                decode_us=int(decode_s * 1e6),
                compute_us=int(compute_s * 1e6),
            ),
            batch_size=done.batch_size,
        )


def _deadline(remaining: float | None, deadline_ms: int) -> float | None:
    budgets = [b for b in (remaining, deadline_ms / 1000 if deadline_ms else None) if b is not None]
    if not budgets:
        return None
    if min(budgets) <= 0:
        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed on arrival")
    return time.monotonic() + min(budgets)


def _checked_payload(request: pb.InferRequest, entry: ModelEntry, width: float) -> bytes:
    """The request's codec bytes, checked against what ``entry`` takes at ``width`` before
    anything is decoded: a v1 header's shape, or a v2 message's rate point and length."""
    shape = entry.shape_for(width)
    has_features = request.HasField("features")
    if request.payload and has_features:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "set payload or features, not both")
    if not request.payload and not has_features:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "features are missing")
    if entropy_codec.is_v2(request.payload):
        _check_v2(request.payload, entry, width, shape)
        return request.payload
    try:
        payload = request.payload or from_message(request.features)
        header = codec.read_header(payload, max_elements=int(np.prod(shape)))
    except codec.CodecError as exc:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"bad features: {exc}") from exc
    if header.shape != shape:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"features have shape {header.shape}; this width takes {shape}",
        )
    return payload


def _check_v2(payload: bytes, entry: ModelEntry, width: float, shape: tuple[int, ...]) -> None:
    widths = entry.manifest.bottleneck.widths
    sent = entropy_codec.width_index_of(payload)
    if sent >= len(widths) or widths[sent] != width:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"bad features: coded at width index {sent} of {widths}; the request says {width}",
        )
    points = len(entry.runner.points)
    point = entropy_codec.point_of(payload)
    if point >= points:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"bad features: rate point {point}; model {entry.name!r} version {entry.version} "
            f"has {points}",
        )
    cap = entropy_codec.payload_cap(int(np.prod(shape)))
    if len(payload) > cap + entropy_codec.HEADER_BYTES:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"bad features: {len(payload)} bytes; {shape} symbols take at most {cap}",
        )


def _fingerprint(request: pb.InferRequest, target: Target) -> bytes:
    """What the request asked for, as sent. Not what it resolved to: a retry that arrives
    after a new version was loaded asks for the same thing, and must be recognised."""
    digest = hashlib.sha256()
    for part in (
        request.model,
        request.version,
        request.adapter,
        request.adapter_version,
        str(target.width),
        str(request.top_k),
        str(request.return_logits),
    ):
        digest.update(part.encode() + b"\0")
    digest.update(target.payload)
    return digest.digest()


def _model_info(entry: ModelEntry) -> pb.ModelInfo:
    m = entry.manifest
    return pb.ModelInfo(
        name=m.name,
        version=m.version,
        arch=m.arch.name,
        cut=m.cut,
        input_shape=m.input.shape,
        labels=m.input.labels,
        widths=m.bottleneck.widths,
        bits=list(codec.SUPPORTED_BITS),
        table=[
            pb.TablePoint(
                width=p.width,
                bits=p.bits or 0,
                accuracy=p.accuracy,
                bytes_per_sample=p.bytes_per_sample,
                codec=p.codec,
                point=p.point or 0,
                beta=p.beta or 0.0,
                entropy_bits=p.entropy_bits or 0.0,
            )
            for p in m.table
        ],
    )


def handlers(service: SplitInferenceService) -> grpc.GenericRpcHandler:
    """The service's method handlers, with :func:`tolerant` request parsing."""

    def unary(method: Callable[..., Any], request: type[Any], response: type[Any]) -> Any:
        return grpc.unary_unary_rpc_method_handler(
            method,
            request_deserializer=tolerant(request),
            response_serializer=response.SerializeToString,
        )

    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Infer": unary(service.Infer, pb.InferRequest, pb.InferResponse),
            "InferStream": grpc.stream_stream_rpc_method_handler(
                service.InferStream,
                request_deserializer=tolerant(pb.InferRequest),
                response_serializer=pb.StreamResult.SerializeToString,
            ),
            "ListModels": unary(service.ListModels, pb.ListModelsRequest, pb.ListModelsResponse),
            "ListAdapters": unary(
                service.ListAdapters, pb.ListAdaptersRequest, pb.ListAdaptersResponse
            ),
            "GetServerInfo": unary(service.GetServerInfo, pb.ServerInfoRequest, pb.ServerInfo),
        },
    )
