"""Where batches run: worker threads in the server's process, or worker processes.

Threads are the default: nothing to start, and torch releases the GIL inside its kernels.
But every batch still runs Python (module calls, decoding) under the server's GIL, which the
event loop needs for every request; when the tail is small, that contention, not the
arithmetic, caps the request rate. Processes take decoding and the forward pass off the
server's GIL entirely, for the price of sending the payloads and the batch's logits across a
pipe once per batch. Worker processes load bundles and adapters themselves, from the paths the
repository found, and keep the ones in use.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

from tandem.adapters import Adapter, AdapterError, load_adapter
from tandem.bundle import BundleError, TailRunner, read_manifest
from tandem.cloud.inference import BatchOutput, Outcome, Target, run_batch, run_targets
from tandem.cloud.repository import ModelEntry
from tandem.lru import lru_get

ComputeKind = Literal["threads", "processes"]
_WORKER_CACHE = 8  # bundle versions a worker process keeps loaded
# Adapters a worker process keeps loaded: one batch may name up to max_batch of them, and a
# request mix that cycles through more than the cache holds would reload them batch after batch.
_WORKER_ADAPTERS = 256


class ComputeFailedError(RuntimeError):
    """The batch could not run, for a reason a retry may not meet (a worker process died)."""


class BundleChangedError(RuntimeError):
    """A worker process found another version on disk than the one the request resolved."""


class Compute(Protocol):
    """Runs one batch of same-key targets (each with its own adapter) and returns one
    outcome per target."""

    ahead: int
    """Batches worth handing over beyond one per worker (see ``cloud/batcher.py``)."""

    async def run(self, targets: Sequence[Target]) -> list[Outcome]:
        """The batch's outcomes, in order."""
        ...

    def close(self) -> None:
        """Release the workers."""
        ...


class ThreadCompute:
    """Batches run on ``workers`` threads of this process."""

    # A batch queued at a busy thread would only close early and small: a thread starts
    # the next batch as soon as the event loop hands it over, with nothing to hide.
    ahead = 0

    def __init__(self, workers: int) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tail")

    async def run(self, targets: Sequence[Target]) -> list[Outcome]:
        """Run the batch in a worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, run_targets, list(targets))

    def close(self) -> None:
        """Wait for running batches, then stop the threads."""
        self._pool.shutdown(wait=True)


AdapterSpec = tuple[str, str, str]
"""How a worker process finds an adapter: (path, name, version)."""


@dataclass(frozen=True)
class BatchSpec:
    """What a worker process needs to find the model and adapters: paths, the manifest's
    mtime, the batch's distinct adapters, and each row's index into them (-1: none)."""

    bundle: str
    version: str
    mtime: float
    width: float
    adapters: tuple[AdapterSpec, ...]
    rows: tuple[int, ...]

    @classmethod
    def of(cls, targets: Sequence[Target]) -> BatchSpec:
        """The spec of a batch of same-key targets."""
        entry = targets[0].entry
        distinct: dict[AdapterSpec, int] = {}
        rows = []
        for target in targets:
            a = target.adapter
            spec = None if a is None else (str(a.path), a.name, a.version)
            rows.append(-1 if spec is None else distinct.setdefault(spec, len(distinct)))
        return cls(
            str(entry.path),
            entry.version,
            entry.mtime,
            targets[0].width,
            tuple(distinct),
            tuple(rows),
        )


class ProcessCompute:
    """Batches run in ``workers`` processes (spawned: forking a gRPC server is unsafe)."""

    def __init__(self, workers: int, torch_threads: int) -> None:
        self._workers, self._torch_threads = workers, torch_threads
        self._pool = self._new_pool()
        # One batch waits at each worker: it crosses the pipe while the worker computes,
        # not after, and the worker never idles while the event loop answers its last batch.
        self.ahead = workers

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self._workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(self._torch_threads, os.getpid()),
        )

    async def run(self, targets: Sequence[Target]) -> list[Outcome]:
        """Send the payloads to a worker process and wait for its scores."""
        spec = BatchSpec.of(targets)
        loop = asyncio.get_running_loop()
        pool = self._pool
        try:
            out = await loop.run_in_executor(pool, run_spec, spec, [t.payload for t in targets])
        except BrokenProcessPool as exc:
            if self._pool is pool:  # every batch of the dead pool fails: replace it once
                self._pool = self._new_pool()
            raise ComputeFailedError("a compute worker died") from exc
        except (BundleChangedError, BundleError, AdapterError, OSError) as exc:
            # Files changed or changing on disk since the last scan: worth a retry.
            raise ComputeFailedError(str(exc)) from exc
        return out.outcomes()

    def close(self) -> None:
        """Wait for running batches, then stop the processes."""
        self._pool.shutdown(wait=True)


def make_compute(kind: ComputeKind, workers: int, torch_threads: int) -> Compute:
    """The compute backend named ``kind``."""
    if kind == "processes":
        return ProcessCompute(workers, torch_threads)
    return ThreadCompute(workers)


# ---------------------------------------------------------------- inside a worker process

_PARENT_POLL_S = 1.0


def _start_worker(torch_threads: int, server_pid: int) -> None:
    """Worker-process set-up: its torch threads, and an exit when the server dies."""
    torch.set_num_threads(torch_threads)
    threading.Thread(target=_exit_with, args=(server_pid,), daemon=True).start()


def _exit_with(server_pid: int) -> None:
    # A server killed with SIGKILL never shuts its pool down, and a worker blocked on the
    # call queue is not told: without this it would live on, holding its models.
    while os.getppid() == server_pid:
        time.sleep(_PARENT_POLL_S)
    os._exit(0)


_entries: OrderedDict[tuple[str, float], ModelEntry] = OrderedDict()
_adapters: OrderedDict[str, Adapter] = OrderedDict()


def _load_entry(spec: BatchSpec) -> ModelEntry:
    path = Path(spec.bundle)
    manifest = read_manifest(path)
    if manifest.version != spec.version:  # replaced on disk since the server loaded it
        raise BundleChangedError(f"{path} now holds version {manifest.version}")
    return ModelEntry(path, manifest, TailRunner.from_bundle(path), spec.mtime)


def _load(spec: AdapterSpec) -> Adapter:
    path, name, version = spec
    return lru_get(
        _adapters, path, lambda: load_adapter(Path(path), name, version), _WORKER_ADAPTERS
    )


def run_spec(spec: BatchSpec, payloads: list[bytes]) -> BatchOutput:
    """Worker-process side: load (or reuse) the model and adapters, and run the batch."""
    key = (spec.bundle, spec.mtime)
    entry = lru_get(_entries, key, lambda: _load_entry(spec), _WORKER_CACHE)
    distinct = [_load(a) for a in spec.adapters]
    rows = [None if i < 0 else distinct[i] for i in spec.rows]
    return run_batch(entry, rows, payloads, spec.width)
