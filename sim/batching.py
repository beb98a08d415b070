"""The cloud service, simulated: batch costs, and batching by ``cloud.batcher``'s rules.

Per key (here a lane: the model's width, or -1 for the whole model), a batch closes when it
holds ``max_batch`` or its oldest request has waited ``max_delay``; it then waits for the first
free worker and takes whatever else of its lane arrived meanwhile, up to ``max_batch``. A lane
starts on its next batch only once its previous one has a worker.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchCost:
    """Milliseconds for a batch of ``n`` on one cloud worker: ``fixed_ms + per_input_ms * n``."""

    fixed_ms: float
    per_input_ms: float

    def seconds(self, n: int) -> float:
        """Seconds for a batch of ``n``."""
        return (self.fixed_ms + self.per_input_ms * n) / 1000


@dataclass(frozen=True)
class CloudModel:
    """The service: batch costs of the tail per width and of the whole model, and batching."""

    tail: dict[float, BatchCost]
    full: BatchCost
    workers: int = 1
    max_batch: int = 32
    max_delay_ms: float = 2.0


def run_batches(
    at: np.ndarray, lane: np.ndarray, cloud: CloudModel, horizon_s: float = np.inf
) -> tuple[np.ndarray, float]:
    """When each request's answer leaves the cloud, and the workers' busy seconds up to
    ``horizon_s`` (work past it, the backlog of an overloaded cloud, does not count).

    Same rules as ``cloud.batcher``: per lane, a batch closes when it holds ``max_batch`` or
    its oldest request has waited ``max_delay``; it then waits for the first free worker and
    takes whatever else of its lane arrived meanwhile, up to ``max_batch``. Lanes compete for
    workers in the order their batches closed.
    """
    done = np.empty(len(at))
    lanes = [(key, np.flatnonzero(lane == key)) for key in np.unique(lane)]
    lanes = [(key, idx[np.argsort(at[idx], kind="stable")]) for key, idx in lanes]
    times = [at[idx] for _, idx in lanes]
    costs = [cloud.full if key < 0 else cloud.tail[float(key)] for key, _ in lanes]
    heads = [0] * len(lanes)
    workers = [0.0] * cloud.workers
    delay, cap, busy = cloud.max_delay_ms / 1000, cloud.max_batch, 0.0
    pending = [(_close_time(a, 0, delay, cap), k) for k, a in enumerate(times) if len(a)]
    heapq.heapify(pending)
    while pending:
        close, k = heapq.heappop(pending)
        start = max(close, heapq.heappop(workers))
        a, h = times[k], heads[k]
        stop = min(int(np.searchsorted(a, start, side="right")), h + cap)
        service = costs[k].seconds(stop - h)
        heapq.heappush(workers, start + service)
        busy += max(0.0, min(start + service, horizon_s) - start)
        done[lanes[k][1][h:stop]] = start + service
        heads[k] = stop
        if stop < len(a):
            # As in cloud.batcher, a lane starts on its next batch only once this one has a
            # worker: it queues for a worker from then, behind lanes that closed earlier.
            heapq.heappush(pending, (max(start, _close_time(a, stop, delay, cap)), k))
    return done, busy


def _close_time(a: np.ndarray, head: int, delay: float, cap: int) -> float:
    full = a[head + cap - 1] if head + cap - 1 < len(a) else np.inf
    return float(min(a[head] + delay, full))
