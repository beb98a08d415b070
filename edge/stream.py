"""The edge side of ``InferStream``: many requests over one stream, resent across failures.

What crosses the wire. A request whose id is ``NAMESPACE#SEQ`` (the spool's ids are, see
:mod:`tandem.stream_ids`) goes as a context number, its seq, its payload and
``answers_read``: a few bytes around the codec's. What it shares with other requests (model,
version, adapter, width, deadline) goes once per stream, in the definition of a context
whose namespace is ``NAMESPACE``; the service keys the request ``NAMESPACE#SEQ``, its own id.
Any other request goes whole.

Nothing lost, nothing twice:

* a request is waiting from :meth:`StreamClient.infer` until its answer or its failure;
* when the stream fails (a transport error, an end with answers missing, or no answer within
  the retry policy's ``attempt_timeout_s``), every waiting request is sent again on a new
  stream after a backoff, under the same key. The service answers a key it has answered from
  its cache, and one still in flight by waiting for that attempt, so nothing is computed
  twice;
* an answer that reports a transient status (a full queue, a draining server) sends that
  request again on the same stream, after its own backoff;
* a request fails only with a final status, or when the retry policy gives up on it (every
  failed stream it waited through counts, sent or not): then with the last transient status,
  as :meth:`CloudClient.infer` would (streams that kept breaking as UNAVAILABLE);
* a request larger than the message limit (the client's, or the smaller one the service
  states) fails alone, RESOURCE_EXHAUSTED, without being sent: sent, it would end the stream.

The window. The service takes on at most ``max_stream_inflight`` unread answers per stream
(:mod:`tandem.cloud.stream_window`): at most that many requests are unanswered here, and each
message reports the answers read so far. Each new stream asks the service its limits again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field

import grpc

from tandem import stream_ids
from tandem.edge.client import Answer, CloudClient
from tandem.protocol import bare_message
from tandem.wire.v1 import split_inference_pb2 as pb

WINDOW_REFUSAL = "max_stream_inflight"
"""Words of the service's status for a stream that broke its window."""
_Echo = tuple[str, int]
"""How an answer names its request: the request id sent (empty for a bare seq) and seq."""
_ContextKey = tuple[object, ...]


@dataclass(eq=False)
class _Waiting:
    """One request from :meth:`StreamClient.infer` until its future is settled."""

    request: pb.InferRequest
    future: asyncio.Future[Answer]
    since: float
    key: tuple[str, int] | None = None
    attempts: int = 0  # times sent
    failures: int = 0  # failed streams and transient answers it has been through
    sent_at: float = 0.0
    sent_bytes: int = 0
    not_before: float = 0.0


@dataclass
class _Stream:
    """What one stream has: its window, its contexts and the requests it has unanswered."""

    window: int
    max_bytes: int
    # Two sends may share an echo (a caller that gave up and sent the id again): each is
    # answered, so each is kept, in the order sent.
    unanswered: dict[_Echo, list[_Waiting]] = field(default_factory=dict)
    outstanding: int = 0
    contexts: OrderedDict[_ContextKey, int] = field(default_factory=OrderedDict)
    answers_read: int = 0
    room: asyncio.Event = field(default_factory=asyncio.Event)

    def sent(self, echo: _Echo, waiting: _Waiting) -> None:
        """Count one message sent under ``echo``."""
        self.unanswered.setdefault(echo, []).append(waiting)
        self.outstanding += 1

    def answered(self, echo: _Echo) -> _Waiting | None:
        """The request an answer under ``echo`` belongs to (None: no such message sent)."""
        sends = self.unanswered.get(echo)
        if not sends:
            return None
        waiting = sends.pop(0)
        if not sends:
            del self.unanswered[echo]
        self.outstanding -= 1
        self.room.set()
        return waiting

    def oldest(self) -> float | None:
        """When the longest-waiting unanswered message was sent."""
        return min((w.sent_at for sends in self.unanswered.values() for w in sends), default=None)


class StreamClient:
    """Requests multiplexed over one ``InferStream`` of a :class:`CloudClient`'s channel,
    under its retry policy, token and ``on_retry`` callback (called once for each request
    sent again, and once for a stream that failed before carrying any)."""

    def __init__(self, client: CloudClient, *, window: int | None = None) -> None:
        """``window``: requests unanswered on a stream; None asks the service for its
        ``max_stream_inflight``. A larger one than the service's is lowered to it."""
        self.client = client
        self._window = window
        self._waiting: dict[str, _Waiting] = {}
        self._outbox: list[_Waiting] = []
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._failures = 0  # streams failed in a row: the backoff's exponent

    async def infer(self, request: pb.InferRequest) -> Answer:
        """The answer to ``request``, sent on the stream (see the module's guarantees).

        Raises:
            grpc.aio.AioRpcError: a final status, or the last transient one when the retry
                policy gives up.
            ValueError: a request with this id is already waiting.
        """
        if request.request_id in self._waiting:
            raise ValueError(f"request {request.request_id} is already waiting")
        loop = asyncio.get_running_loop()
        key = stream_ids.split(request.request_id) if request.model else None
        waiting = _Waiting(request, loop.create_future(), loop.time(), key)
        self._waiting[request.request_id] = waiting
        self._post(waiting)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        try:
            return await waiting.future
        finally:  # answered, failed, or the caller stopped waiting
            self._waiting.pop(request.request_id, None)

    async def close(self) -> None:
        """Stop the stream and close the channel; requests still waiting are cancelled."""
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        for waiting in list(self._waiting.values()):
            waiting.future.cancel()
        await self.client.close()

    # ------------------------------------------------------------------ streams, in turn

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if all(w.future.done() for w in self._waiting.values()):
                    self._wake.clear()
                    await self._wake.wait()
                try:
                    await self._stream()
                except grpc.aio.AioRpcError as exc:
                    if not self._transient(exc):
                        self._settle_all(exc)
                        continue
                    self._requeue(exc, loop.time())
                    await asyncio.sleep(self.client.retry.delay(self._failures, self.client.rng))
                    self._failures += 1
        except BaseException as exc:
            # A bug here must not leave callers waiting forever: they fail with it.
            for waiting in self._waiting.values():
                if waiting.future.done():
                    continue
                if isinstance(exc, Exception):
                    waiting.future.set_exception(exc)
                else:  # cancelled (close): so are they
                    waiting.future.cancel()
            raise

    def _transient(self, exc: grpc.aio.AioRpcError) -> bool:
        """Whether a stream that ended with ``exc`` is worth a new one: what the retry
        policy retries; INTERNAL, which gRPC's core reports for a stream reset under a
        message (the link's failure: the service's refusals have statuses of their own, and
        a request it fails is failed in its answer); and a window refusal, which a new stream
        avoids by asking the service's window again (a restarted service may have lowered
        it)."""
        return (
            exc.code() == grpc.StatusCode.INTERNAL
            or (exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and WINDOW_REFUSAL in str(exc))
            or self.client.transient(exc)
        )

    async def _stream(self) -> None:
        """One stream, until it fails (raises); an idle one stays open for what comes."""
        stream = await self._limits()
        call = self.client.stub.InferStream(metadata=self.client.metadata)
        tasks = [
            asyncio.create_task(self._write(call, stream)),
            asyncio.create_task(self._read(call, stream)),
            asyncio.create_task(self._watch(stream)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # the failure that ended the stream
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            call.cancel()

    async def _limits(self) -> _Stream:
        """A new stream's state, under the service's limits as it states them now."""
        info = await self.client.server_info(timeout=self.client.retry.attempt_timeout_s)
        window = max(1, int(info.max_stream_inflight))
        max_bytes = self.client.max_message_bytes
        if info.max_message_bytes:
            max_bytes = min(max_bytes, int(info.max_message_bytes))
        return _Stream(min(window, self._window) if self._window else window, max_bytes)

    def _requeue(self, exc: grpc.aio.AioRpcError, now: float) -> None:
        """After a failed stream: fail what the policy gives up on, send the rest again."""
        self.client.last_transient = exc
        waiting = [w for w in self._waiting.values() if not w.future.done()]
        for w in waiting:
            w.failures += 1
            if self.client.exhausted(w.failures - 1, now - w.since):
                w.future.set_exception(_gave_up(exc))
            elif w.attempts:
                self._notify_retry(exc.code())
        if waiting and not any(w.attempts for w in waiting):
            self._notify_retry(exc.code())  # the stream failed before carrying any
        self._outbox = sorted(
            (w for w in self._waiting.values() if not w.future.done()), key=lambda w: w.since
        )

    def _settle_all(self, exc: grpc.aio.AioRpcError) -> None:
        """A final status for the whole stream (refused credentials, say): every waiting
        request ends with it."""
        for waiting in self._waiting.values():
            if not waiting.future.done():
                waiting.future.set_exception(exc)
        self._outbox.clear()

    def _notify_retry(self, code: grpc.StatusCode) -> None:
        if self.client.on_retry is not None:
            self.client.on_retry(code)

    # ------------------------------------------------------------------ writing

    def _post(self, waiting: _Waiting) -> None:
        self._outbox.append(waiting)
        self._wake.set()

    async def _next(self) -> _Waiting:
        """The next request due to be sent, waiting for one when there is none."""
        loop = asyncio.get_running_loop()
        while True:
            self._outbox = [w for w in self._outbox if self._waiting.get(w.request.request_id) is w]
            due = [w for w in self._outbox if w.not_before <= loop.time()]
            if due:
                self._outbox.remove(due[0])
                return due[0]
            self._wake.clear()
            later = min((w.not_before for w in self._outbox), default=None)
            timeout = None if later is None else later - loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _write(self, call: grpc.aio.StreamStreamCall, stream: _Stream) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiting = await self._next()
            while stream.outstanding >= stream.window:
                stream.room.clear()
                await stream.room.wait()
            messages, echo = _messages(waiting, stream)
            size = messages[-1].ByteSize()
            if size > stream.max_bytes:  # it would end the stream: it fails alone
                waiting.future.set_exception(_error(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"a request of {size} bytes exceeds the {stream.max_bytes}-byte message limit",
                ))  # fmt: skip
                continue
            waiting.attempts += 1
            waiting.sent_at = loop.time()
            waiting.sent_bytes = size
            stream.sent(echo, waiting)
            for message in messages:
                await _write_one(call, message)

    # ------------------------------------------------------------------ reading

    async def _read(self, call: grpc.aio.StreamStreamCall, stream: _Stream) -> None:
        loop = asyncio.get_running_loop()
        while True:
            result = await call.read()
            if result is grpc.aio.EOF:
                raise _error(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the service ended the stream with {stream.outstanding} answers due",
                )
            stream.answers_read += 1
            self._failures = 0  # the stream works: the next failure starts a fresh backoff
            waiting = stream.answered((result.request_id, result.seq))
            if waiting is None or waiting.future.done():
                continue  # its caller stopped waiting
            if result.HasField("response"):
                waiting.future.set_result(
                    Answer(
                        result.response,
                        waiting.attempts,
                        loop.time() - waiting.sent_at,
                        waiting.sent_bytes,
                    )
                )
            else:
                self._failed(waiting, _error_of(result.error), loop.time())

    def _failed(self, waiting: _Waiting, exc: grpc.aio.AioRpcError, now: float) -> None:
        """One request's own failure: final, or sent again after its backoff."""
        waiting.failures += 1
        if not self.client.transient(exc) or self.client.exhausted(
            waiting.failures - 1, now - waiting.since
        ):
            waiting.future.set_exception(exc)
            return
        self.client.last_transient = exc
        self._notify_retry(exc.code())
        waiting.not_before = now + self.client.retry.delay(waiting.failures - 1, self.client.rng)
        self._post(waiting)

    async def _watch(self, stream: _Stream) -> None:
        """Fail the stream when its oldest unanswered request has waited past the attempt
        timeout: the link (or the service) has stalled, and a new stream is the way out."""
        loop = asyncio.get_running_loop()
        timeout = self.client.retry.attempt_timeout_s
        while True:
            await asyncio.sleep(min(timeout / 4, 0.5))
            oldest = stream.oldest()
            if oldest is not None and loop.time() - oldest > timeout:
                raise _error(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer on the stream in {timeout:g} s"
                )


def _messages(waiting: _Waiting, stream: _Stream) -> tuple[list[pb.InferRequest], _Echo]:
    """What to write for one request (a context's definition first, when the stream lacks
    it), and how its answer will name it."""
    request, key = waiting.request, waiting.key
    if key is None or ("", key[1]) in stream.unanswered:
        # An id that is not NAMESPACE#SEQ, or another namespace's request with this seq is
        # unanswered here: sent whole, it is answered under its own id.
        whole = pb.InferRequest()
        whole.CopyFrom(request)
        whole.answers_read = stream.answers_read
        return [whole], (request.request_id, 0)
    namespace, seq = key
    context_key = (namespace, *(getattr(request, name) for name in stream_ids.SHARED_FIELDS))
    out: list[pb.InferRequest] = []
    number = stream.contexts.get(context_key)
    if number is None:
        number = _context_number(stream)
        definition = pb.InferRequest(request_id=namespace, context=number)
        for name in stream_ids.SHARED_FIELDS:
            setattr(definition, name, getattr(request, name))
        out.append(definition)
    stream.contexts[context_key] = number
    stream.contexts.move_to_end(context_key)
    out.append(bare_message(request, number, seq, stream.answers_read))
    return out, ("", seq)


def _context_number(stream: _Stream) -> int:
    """A free context number, or the least recently used one (redefined: the service
    resolves each message as it reads it, so messages already sent keep their context)."""
    if len(stream.contexts) < stream_ids.MAX_CONTEXTS:
        return len(stream.contexts) + 1
    _, number = stream.contexts.popitem(last=False)
    return number


async def _write_one(call: grpc.aio.StreamStreamCall, message: pb.InferRequest) -> None:
    """Write one message; onto a stream that has ended, raise UNAVAILABLE, so that what it
    carried goes again on a new one."""
    try:
        await call.write(message)
    except asyncio.InvalidStateError:
        raise _error(grpc.StatusCode.UNAVAILABLE, "the stream ended under a write") from None


def _gave_up(exc: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    """The error a request gives up with: ``exc``, except that streams that kept ending
    INTERNAL (reset under a message) are the link's failure, reported as UNAVAILABLE as a
    unary call's would be, so that callers fall back or keep the request as they do then."""
    if exc.code() != grpc.StatusCode.INTERNAL:
        return exc
    return _error(grpc.StatusCode.UNAVAILABLE, f"the stream kept breaking: {exc.details()}")


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _error_of(status: pb.Status) -> grpc.aio.AioRpcError:
    """A streamed answer's failure, as the exception a unary call would have raised."""
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    return _error(code, status.message)
