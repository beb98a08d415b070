"""Dynamic batching: requests for the same (model, version, width) share a pass.

The service leaves the adapter out of the key: one batch serves rows that name different
adapters, or none (``cloud/lora_batch.py``), so a mix of many adapters still fills batches.

A batch closes when it holds ``max_batch`` requests or when its oldest request has waited
``max_delay_s``, whichever comes first. It then waits for a free worker, and takes whatever
else arrived meanwhile (up to ``max_batch``): under load, batches grow by themselves. The
batch itself runs off the event loop, on the compute backend (``cloud/compute.py``).

With ``ahead`` > 0, that many batches beyond one per worker are handed to the backend, which
queues them: a worker then starts its next batch the moment it finishes, rather than idling
while the event loop answers the batch just done and dispatches the next one.

The queue is bounded: past ``max_queue`` waiting requests, :meth:`Batcher.submit` raises
:class:`QueueFullError` (the server answers RESOURCE_EXHAUSTED) instead of growing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any


class QueueFullError(RuntimeError):
    """The batcher holds ``max_queue`` requests already."""


class BatcherClosedError(RuntimeError):
    """The batcher was closed: the server is stopping."""


class DeadlinePassedError(TimeoutError):
    """The request's deadline passed before it reached a worker."""


@dataclass
class Job:
    """One queued request."""

    payload: Any
    deadline: float | None  # time.monotonic() seconds (the event loop's clock), or None
    enqueued: float = field(default_factory=time.monotonic)
    future: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass
class Done:
    """A job's result with its queue time and the size of the batch it ran in."""

    value: Any
    queue_s: float
    batch_size: int


# payloads of one batch -> one result per payload (the compute backend runs it off the loop).
RunBatch = Callable[[Sequence[Any]], Awaitable[Sequence[Any]]]


class _Lane:
    def __init__(self) -> None:
        self.jobs: deque[Job] = deque()
        self.arrived = asyncio.Event()
        self.full = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class Batcher:
    """Groups submitted jobs by key into batches and hands each batch to ``run``."""

    def __init__(
        self,
        run: RunBatch,
        *,
        workers: int,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        ahead: int = 0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if workers < 1 or max_batch < 1 or max_queue < 1 or max_delay_s < 0 or ahead < 0:
            raise ValueError(
                "workers, max_batch and max_queue must be >= 1, max_delay_s and ahead >= 0"
            )
        self._run = run
        self._slots = asyncio.Semaphore(workers + ahead)
        self.max_batch, self.max_delay_s, self.max_queue = max_batch, max_delay_s, max_queue
        self._on_batch = on_batch
        self._lanes: dict[Hashable, _Lane] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        self.queued = 0

    def submit(self, key: Hashable, payload: Any, deadline: float | None) -> asyncio.Future[Any]:
        """Queue one payload; the future resolves to a :class:`Done`.

        Raises:
            QueueFullError: when ``max_queue`` jobs are already waiting.
            BatcherClosedError: after :meth:`close`.
        """
        if self._closed:
            raise BatcherClosedError("the batcher is closed")
        if self.queued >= self.max_queue:
            raise QueueFullError(f"queue full ({self.max_queue} requests waiting)")
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
            lane.task = asyncio.create_task(self._collect(key, lane))
        job = Job(payload, deadline)
        lane.jobs.append(job)
        self.queued += 1
        lane.arrived.set()
        if len(lane.jobs) >= self.max_batch:
            lane.full.set()
        return job.future

    async def _collect(self, key: Hashable, lane: _Lane) -> None:
        while True:
            while not lane.jobs:
                lane.arrived.clear()
                await lane.arrived.wait()
            if len(lane.jobs) < self.max_batch:
                # One timer per batch rather than a timed wait per arrival: cheaper under load.
                lane.full.clear()
                close_at = lane.jobs[0].enqueued + self.max_delay_s
                timer = asyncio.get_running_loop().call_at(close_at, lane.full.set)
                await lane.full.wait()
                timer.cancel()
            await self._slots.acquire()
            batch = [lane.jobs.popleft() for _ in range(min(self.max_batch, len(lane.jobs)))]
            self.queued -= len(batch)
            task = asyncio.create_task(self._dispatch(key, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _dispatch(self, key: Hashable, batch: list[Job]) -> None:
        try:
            now = time.monotonic()
            live = []
            for job in batch:
                if job.future.done():  # the caller gave up (cancelled RPC)
                    continue
                if job.deadline is not None and now >= job.deadline:
                    job.future.set_exception(DeadlinePassedError("deadline passed in the queue"))
                    continue
                live.append(job)
            if live:
                await self._run_live(live, now)
        finally:
            self._slots.release()

    async def _run_live(self, live: list[Job], now: float) -> None:
        # Whatever goes wrong, every job gets an answer: a caller must never hang.
        try:
            if self._on_batch:
                self._on_batch(len(live))
            results = list(await self._run([j.payload for j in live]))
            if len(results) != len(live):
                raise RuntimeError(f"the batch returned {len(results)} results for {len(live)}")
        except BaseException as exc:  # a failed batch fails its requests, not the server
            failure = exc if isinstance(exc, Exception) else RuntimeError("batch cancelled")
            for job in live:
                if not job.future.done():
                    job.future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        for job, value in zip(live, results, strict=True):
            if not job.future.done():
                job.future.set_result(Done(value, now - job.enqueued, len(live)))

    async def close(self) -> None:
        """Finish the batches already running, then stop collecting; later submits raise."""
        self._closed = True
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)
        for lane in self._lanes.values():
            if lane.task:
                lane.task.cancel()
        await asyncio.gather(
            *(lane.task for lane in self._lanes.values() if lane.task), return_exceptions=True
        )
        for lane in self._lanes.values():
            for job in lane.jobs:
                if not job.future.done():
                    job.future.set_exception(BatcherClosedError("server stopped"))
            self.queued -= len(lane.jobs)
            lane.jobs.clear()
