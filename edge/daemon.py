"""The edge daemon: source -> spool -> head -> cloud (or local) -> sink.

Nothing accepted is lost and nothing is answered twice:

* an input is written to the spool (SQLite, WAL) before anything is done with it;
* its encoded features are stored there too before the first send, so every resend, even
  after a restart, carries the same bytes under the same ``request_id``;
* it leaves the spool only after its result line is in the sink; on start, entries whose
  result the sink already holds (the daemon died between the two writes) are dropped.

Sending is pipelined: one task batches inputs through the head, many tasks keep requests
in flight. The split policy picks width and codec (bits, or a rate point of the entropy
model) per batch from the bundle's measured table and the live link estimate; when the cloud
is unreachable and the bundle carries its full model, inputs are served locally and their
records say so.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from tandem import entropy_codec
from tandem.edge.client import (
    OVERLOADED,
    RETRYABLE,
    Answer,
    ClientSecurity,
    CloudClient,
    RetryPolicy,
    Sender,
)
from tandem.edge.config import DaemonConfig
from tandem.edge.device import DeviceModels, Encoding
from tandem.edge.feed import SourceFeed
from tandem.edge.sinks import open_sink
from tandem.edge.sources import Item, Source, open_source
from tandem.edge.spool import Spool, SpoolEntry, SpoolError
from tandem.edge.stats import REPORT_EVERY_S, Outage, RunStats
from tandem.edge.stream import StreamClient
from tandem.link import LinkEstimator
from tandem.policy import SplitPolicy
from tandem.wire.v1 import split_inference_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")

STOP_GRACE_S = 5.0
"""After a stop signal, how long requests in flight may take before the daemon leaves them
pending in the spool for the next run."""


@dataclass
class _Ready:
    """An entry about to be served: its payload, or None when it has an error or goes local."""

    entry: SpoolEntry
    payload: bytes | None
    started: float = field(default_factory=time.monotonic)
    local: bool = False


class EdgeDaemon:
    """One run of the daemon over one source."""

    def __init__(
        self,
        cfg: DaemonConfig,
        *,
        progress: Callable[[int], object] | None = None,
        stop: asyncio.Event | None = None,
        notify: Callable[[str], object] = log.info,
        heartbeat_s: float | None = None,
    ) -> None:
        """``notify`` receives what the user should hear about the run itself (what was
        resumed, the heartbeat); ``heartbeat_s`` (None: none) is how often it hears how far
        the run has come."""
        self.cfg = cfg
        self.progress = progress
        self.stop = stop or asyncio.Event()
        self.notify = notify
        self.heartbeat_s = heartbeat_s
        self.stats = RunStats()
        self.outage = Outage(cfg.cloud, every_s=REPORT_EVERY_S)
        self._gave_up: str | None = None
        self.link = LinkEstimator()
        self._device_pool = ThreadPoolExecutor(1, thread_name_prefix="head")
        self._spool_pool = ThreadPoolExecutor(1, thread_name_prefix="spool")
        self._done: list[str] = []
        self._cloud_down_until = 0.0
        self._refusals: set[grpc.StatusCode] = set()

    async def run(self) -> dict[str, Any]:
        """Process the whole source (or until ``stop`` is set); return the run's summary."""
        try:
            return await self._run()
        finally:
            self._device_pool.shutdown()
            self._spool_pool.shutdown()

    async def _run(self) -> dict[str, Any]:
        # A head adapter decides which tail adapter, width and bits go with it.
        self.cfg = cfg = self.cfg.paired()
        self.device = await self._in(
            self._device_pool,
            lambda: DeviceModels(
                cfg.bundle,
                fallback=cfg.fallback,
                batch=cfg.head_batch,
                adapter=cfg.head_adapter,
                runtime=cfg.runtime,
            ),
        )
        manifest = self.device.manifest
        source = open_source(cfg.source, manifest.input.shape, manifest.input.labels)
        self.policy = await self._make_policy()
        local = self.device.full is not None
        retry = RetryPolicy(
            attempt_timeout_s=cfg.attempt_timeout_s,
            give_up_after_s=cfg.fallback_after_s if local else cfg.give_up_after_s,
        )
        if local:
            self._retrying = f"serving locally after {cfg.fallback_after_s:g} s"
        elif cfg.give_up_after_s is not None:
            self._retrying = f"retrying, giving up after {cfg.give_up_after_s:g} s"
        else:
            self._retrying = "retrying until it answers (--give-up-after-s bounds this)"
        security = ClientSecurity(cfg.ca, cfg.cert, cfg.key, cfg.token(), cfg.tls)
        self.client = CloudClient(
            cfg.cloud,
            security=security,
            retry=retry,
            max_message_bytes=cfg.max_message_bytes,
            on_retry=self._retried,
        )
        self.sender: Sender = (
            StreamClient(self.client) if cfg.transport == "stream" else self.client
        )
        started = time.monotonic()
        path = cfg.spool_path()
        temporary = path is None
        if path is None:  # the stdout sink: nothing left in the working directory
            path = Path(tempfile.mkdtemp(prefix="tandem-edge-")) / "spool"
        pending: int | None = None
        try:
            # The spool first: its lock keeps a second daemon from touching the sink.
            with Spool(path) as spool, open_sink(cfg.sink) as sink:
                self.sink, self.spool = sink, spool
                self._start(source)
                try:
                    await self._run_pipeline(source)
                finally:
                    pending = _count(spool)
        finally:
            await self.sender.close()
            # Nothing pending, or the run never got to accept an input: nothing to keep.
            if temporary and not pending:
                shutil.rmtree(path.parent, ignore_errors=True)
            elif temporary:
                log.warning("temporary spool %s kept: %d inputs left pending (--spool %s "
                            "serves them)", path, pending, path)  # fmt: skip
        summary = self.stats.summary(time.monotonic() - started, has_labels=source.has_labels)
        return {**summary, "pending": pending, "spool": str(path), "gave_up": self._gave_up}

    # ------------------------------------------------------------------ set-up

    async def _in(self, pool: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn)

    async def _make_policy(self) -> SplitPolicy | None:
        cfg, m = self.cfg, self.device.manifest
        if cfg.fixed():
            assert cfg.width is not None
            self.device.head.check_width(cfg.width)  # fail at start-up, not per batch
            if cfg.point is not None:
                self.device.head.rate_point(cfg.point)
            return None
        table = [
            p.model_dump()
            for p in m.table
            if (cfg.width is None or p.width == cfg.width)
            and (cfg.bits is None or (p.codec == "quantize" and p.bits == cfg.bits))
            and (cfg.point is None or (p.codec == "entropy" and p.point == cfg.point))
        ]
        if not table:
            raise ValueError(
                "the bundle's table has no point to choose from: give --width and --bits "
                "(or --point)"
            )
        head_ms = await self._in(self._device_pool, self.device.time_head)
        local_ms = await self._in(self._device_pool, self.device.time_local)
        return SplitPolicy.from_table(table, cfg.slo_ms, head_ms, local_ms=local_ms)

    def _start(self, source: Source) -> None:
        """Discard the spool (``fresh``), or say what is resumed from it."""
        spool = self.spool
        if self.cfg.fresh:
            pending, cursors = spool.clear()
            self.notify(
                f"--fresh: discarded {pending} pending inputs and {cursors} source cursors "
                f"from spool {spool.path}"
            )
            return
        self._reconcile()
        pending, cursor = len(spool), spool.cursor(source.key)
        if pending or cursor:
            self.notify(
                f"resuming spool {spool.path}: {pending} inputs pending, {source.key} read up "
                f"to index {cursor} (--fresh starts over)"
            )

    def _reconcile(self) -> None:
        # The daemon may have died after writing a result but before clearing its entry.
        done = [e.request_id for e in self.spool.pending() if e.request_id in self.sink.written_ids]
        if done:
            log.info("%d spooled inputs already have results; clearing them", len(done))
            self.spool.complete(done)

    # ------------------------------------------------------------------ pipeline

    async def _run_pipeline(self, source: Source) -> None:
        try:
            await self._pipeline(source)
        except BaseException:
            # Results already in the sink still leave the spool; the spool thread runs jobs in
            # order, so this also waits for any a cancelled completer left behind.
            try:
                await self._flush_done()
            except Exception:
                log.exception("could not clear finished inputs from the spool")
            raise
        await self._flush_done()

    async def _pipeline(self, source: Source) -> None:
        cfg = self.cfg
        self.encode_q: asyncio.Queue[SpoolEntry] = asyncio.Queue(maxsize=2 * cfg.head_batch)
        self.send_q: asyncio.Queue[_Ready] = asyncio.Queue(maxsize=2 * cfg.concurrency)
        workers = [asyncio.create_task(self._encoder())]
        workers += [asyncio.create_task(self._sender()) for _ in range(cfg.concurrency)]
        workers.append(asyncio.create_task(self._completer()))
        if self.heartbeat_s is not None:
            workers.append(asyncio.create_task(self._heartbeat(self.heartbeat_s)))
        flow = asyncio.create_task(self._flow(source))
        stopping = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait({flow, stopping, *workers}, return_when=FIRST_COMPLETED)
            _raise_if_failed(workers)
            if not flow.done():
                # Stopped: everything read is spooled. Give requests in flight a moment; what
                # is still pending after that is sent by the next run.
                await asyncio.wait(
                    {flow, *workers}, timeout=STOP_GRACE_S, return_when=FIRST_COMPLETED
                )
                _raise_if_failed(workers)
            if flow.done():
                flow.result()  # a failing source fails the run
        finally:
            for task in [flow, stopping, *workers]:
                task.cancel()
            await asyncio.gather(flow, stopping, *workers, return_exceptions=True)

    async def _flow(self, source: Source) -> None:
        await self._produce(source)
        await self.encode_q.join()
        await self.send_q.join()

    async def _produce(self, source: Source) -> None:
        for entry in await self._in(self._spool_pool, self.spool.pending):
            await self._route(entry)
        # A replayable source resumes at the cursor; a stream numbers its items from there.
        start = await self._in(self._spool_pool, lambda: self.spool.cursor(source.key))
        # Read ahead only what can be re-read: an item taken from a stream exists nowhere
        # else until the spool has it.
        ahead = 2 * self.cfg.head_batch if source.replayable else 1
        feed = SourceFeed(source.iter_from(start, self.cfg.limit), ahead)
        while not self.stop.is_set():
            chunk = await feed.chunk(self.cfg.head_batch, self.stop)
            if not chunk:
                break
            accepted = await self._in(self._spool_pool, partial(_accept, self.spool, source, chunk))
            for entry in accepted:
                await self._route(entry)
        if self.stop.is_set():
            # What was already read from a stream is spooled for the next run, not dropped.
            left = await feed.drain()
            if left:
                await self._in(self._spool_pool, partial(_accept, self.spool, source, left))

    async def _route(self, entry: SpoolEntry) -> None:
        if entry.error is not None:
            await self.send_q.put(_Ready(entry, None))
        elif entry.payload is not None:
            await self.send_q.put(_Ready(entry, entry.payload))
        else:
            await self.encode_q.put(entry)

    async def _encoder(self) -> None:
        while True:
            batch = [await self.encode_q.get()]
            while len(batch) < self.cfg.head_batch and not self.encode_q.empty():
                batch.append(self.encode_q.get_nowait())
            try:
                await self._encode(batch)
            finally:
                for _ in batch:
                    self.encode_q.task_done()

    async def _encode(self, batch: list[SpoolEntry]) -> None:
        started = time.monotonic()
        point = self._operating_point()
        if point is None:  # the policy expects the local model to answer sooner
            for e in batch:
                await self.send_q.put(_Ready(e, None, started, local=True))
            return
        width, bits = point.width, point.bits
        encoded = await self._in(self._device_pool, partial(self._head, batch, point))
        rows = [(e.request_id, width, bits, p) for e, p in encoded if isinstance(p, bytes)]
        await self._in(self._spool_pool, lambda: self.spool.assign(rows))
        for e, p in encoded:
            if isinstance(p, bytes):
                entry = replace(e, width=width, bits=bits, payload=p)
                await self.send_q.put(_Ready(entry, p, started))
            else:  # this input cannot be encoded: its error goes to the sink
                await self.send_q.put(_Ready(replace(e, error=p), None, started))

    def _head(
        self, batch: list[SpoolEntry], encoding: Encoding
    ) -> list[tuple[SpoolEntry, bytes | str]]:
        """Payloads for a batch (device thread); one input that fails, fails alone."""
        try:
            x = np.stack([e.array() for e in batch])
            return list(zip(batch, self.device.encode(x, encoding), strict=True))
        except ValueError:
            pass  # find the culprit: encode one by one
        out: list[tuple[SpoolEntry, bytes | str]] = []
        for e in batch:
            try:
                out.append((e, self.device.encode(e.array()[None], encoding)[0]))
            except ValueError as exc:
                out.append((e, f"cannot encode input: {exc}"))
        return out

    def _operating_point(self) -> Encoding | None:
        """How to code the next batch, or None to serve it with the local model."""
        if self.policy is None:
            assert self.cfg.width is not None
            return Encoding(self.cfg.width, self.cfg.bits, self.cfg.point)
        decision = self.policy.decide(self.link.state())
        if decision.local or decision.width is None:
            return None
        return Encoding(decision.width, decision.bits, decision.point)

    async def _sender(self) -> None:
        while True:
            item = await self.send_q.get()
            try:
                try:
                    record = await self._serve(item)
                except _GaveUp as exc:
                    self._give_up(str(exc))
                    continue  # no line: the input stays in the spool for the next run
                except (ValueError, RuntimeError) as exc:  # this input, not the daemon
                    log.warning("input %d failed: %s", item.entry.input_index, exc)
                    record = {**_base(item.entry), "error": f"cannot serve input: {exc}"}
                # Failing to write the sink is not this input's fault: it fails the run.
                self.sink.write(record)
                self.stats.add(record)
                self._done.append(item.entry.request_id)
                if self.progress:
                    self.progress(1)
            finally:
                self.send_q.task_done()

    def _give_up(self, why: str) -> None:
        if self._gave_up is None:
            self._gave_up = why
            self.stop.set()

    async def _heartbeat(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            pending = await self._in(self._spool_pool, self.spool.__len__)
            s = self.stats
            self.notify(f"{s.processed} processed ({s.errors} failed), {pending} pending")

    async def _completer(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            await self._flush_done()

    async def _flush_done(self) -> None:
        done, self._done = self._done, []
        if done:
            try:
                await self._in(self._spool_pool, partial(self._complete, done))
            except BaseException:
                self._done = done + self._done  # completing twice is harmless; never zero times
                raise

    def _complete(self, done: list[str]) -> None:
        # Results reach the disk before their inputs leave the spool: a power cut in between
        # repeats nothing (the sink's ids say what is there) and loses nothing.
        self.sink.sync()
        self.spool.complete(done)

    # ------------------------------------------------------------------ serving one input

    async def _serve(self, item: _Ready) -> dict[str, Any]:
        entry = item.entry
        base = _base(entry)
        if entry.error is not None:
            return {**base, "error": entry.error}
        if item.local or self._cloud_is_down():
            return {**base, **await self._serve_locally(item)}
        assert item.payload is not None  # only local and failed entries lack one
        request = pb.InferRequest(
            request_id=entry.request_id,
            model=self.cfg.model or self.device.manifest.name,
            # Pinned: only the tail this head was trained with can decode its features. A newer
            # bundle under the same name is another model, and the service refuses the
            # request (NOT_FOUND) rather than answer with it once this version is gone.
            version=self.device.manifest.version,
            adapter=self.cfg.adapter,
            adapter_version=self.cfg.adapter_version,
            width=float(entry.width or 0.0),
            payload=item.payload,  # the codec's bytes whole: what is counted is what is sent
            deadline_ms=self.cfg.deadline_ms,
        )
        try:
            answer = await self.sender.infer(request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in {*RETRYABLE, OVERLOADED} and self.device.full is not None:
                self._cloud_down_until = time.monotonic() + self.cfg.probe_s
                self._cloud_failed(_status(exc))
                return {**base, **await self._serve_locally(item)}
            if self.client.transient(exc):  # retried until the policy gave up
                raise _GaveUp(
                    f"gave up after retrying cloud {self.cfg.cloud} for "
                    f"{self.cfg.give_up_after_s:g} s ({_status(exc)})"
                ) from exc
            return {**base, "error": self._refused(entry, exc)}
        self._report(self.outage.answered())
        return {**base, **self._cloud_record(item, request, answer)}

    def _retried(self, code: grpc.StatusCode) -> None:
        self.stats.count_retry()
        last = self.client.last_transient
        self._cloud_failed(code.name if last is None else _status(last))

    def _cloud_failed(self, why: str) -> None:
        self._report(self.outage.failed(why), f": {self._retrying}")

    @staticmethod
    def _report(line: str | None, then: str = "") -> None:
        if line is not None:
            log.warning("%s%s", line, then)

    def _refused(self, entry: SpoolEntry, exc: grpc.aio.AioRpcError) -> str:
        """The error line for a final answer; logged the first time its status code is seen,
        since the same refusal (say, no such model version) usually repeats for every input."""
        error = _status(exc)
        if exc.code() not in self._refusals:
            self._refusals.add(exc.code())
            log.error(
                "the cloud refused input %d: %s (further %s answers are counted, not logged)",
                entry.input_index, error, exc.code().name,
            )  # fmt: skip
        return error

    def _cloud_is_down(self) -> bool:
        return self.device.full is not None and time.monotonic() < self._cloud_down_until

    def _cloud_record(
        self, item: _Ready, request: pb.InferRequest, answer: Answer
    ) -> dict[str, Any]:
        response = answer.response
        t = response.timings
        server_ms = (t.queue_us + t.decode_us + t.compute_us) / 1000
        if answer.attempts == 1:
            self.link.observe(
                answer.sent_bytes, response.ByteSize(), 1000 * answer.last_attempt_s, server_ms
            )
        if self.policy is not None:
            self.policy.set_server_ms(server_ms)
        return {
            **self._prediction(response.top[0].index, response.model_version),
            "width": item.entry.width,
            "bits": item.entry.bits,
            "point": _rate_point(item.payload),
            "bytes_sent": answer.sent_bytes,
            "latency_ms": round(1000 * (time.monotonic() - item.started), 3),
            "served_by": response.served_by,
        }

    async def _serve_locally(self, item: _Ready) -> dict[str, Any]:
        x = item.entry.array()[None]
        prediction = (await self._in(self._device_pool, lambda: self.device.predict_local(x)))[0]
        return {
            **self._prediction(prediction, self.device.manifest.version),
            "width": None,
            "bits": None,
            "point": None,
            "bytes_sent": 0,
            "latency_ms": round(1000 * (time.monotonic() - item.started), 3),
            "served_by": "local",
        }

    def _prediction(self, index: int, model_version: str) -> dict[str, Any]:
        """The predicted class, its name when the bundle names its classes, and the version of
        the model that made it."""
        labels = self.device.manifest.input.labels
        named = {"class_name": labels[index]} if 0 <= index < len(labels) else {}
        return {"prediction": index, **named, "model_version": model_version}


class _GaveUp(Exception):
    """The cloud stayed unreachable for as long as the run may retry it."""


def _status(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


def _count(spool: Spool) -> int | None:
    """Pending entries, or None when even that cannot be read (the run is failing anyway)."""
    try:
        return len(spool)
    except SpoolError:
        return None


def _base(entry: SpoolEntry) -> dict[str, Any]:
    base: dict[str, Any] = {"request_id": entry.request_id, "input_index": entry.input_index}
    if entry.label is not None:
        base["label"] = entry.label
    return base


def _raise_if_failed(workers: list[asyncio.Task[None]]) -> None:
    # Workers loop until cancelled: one that has finished has failed. Failing the run keeps
    # its entries in the spool for the next one, where carrying on with fewer workers (or
    # none) would hang.
    for task in workers:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"edge worker failed: {task.exception()!r}") from task.exception()


def _accept(spool: Spool, source: Source, chunk: list[Item]) -> list[SpoolEntry]:
    rows = [(i.index, i.label, i.x if i.x is not None else str(i.error)) for i in chunk]
    return spool.accept(source.key, rows)


def _rate_point(payload: bytes | None) -> int | None:
    """The rate point an entropy-coded payload names in its header (None for quantise+zstd)."""
    return entropy_codec.point_of(payload) if payload and entropy_codec.is_v2(payload) else None
