"""Dynamic batching: when batches close, who shares them, and how failures stay contained.

Timing is driven by a ``run`` that holds each batch until the test releases it, so the
outcomes do not depend on how fast the machine is. Where a time window is inherent
(``max_delay_s``), the values are either generous (60 s: a batch that must not wait for
it) or tiny (10 ms: a batch that must close by it), and only outcomes are asserted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest

from tandem.cloud.batcher import (
    Batcher,
    BatcherClosedError,
    DeadlinePassedError,
    Done,
    QueueFullError,
)

LONG = 60.0  # a delay no test waits out: batches that close must close for another reason
SHORT = 0.01  # a delay every test may wait out
TIMEOUT = 5.0  # a bound on any wait, so a hang fails instead of stalling the suite


class Gate:
    """A ``run`` that records each batch and holds it until :meth:`open` (or from the start)."""

    def __init__(self, *, held: bool = False, fail_on: Any = None) -> None:
        self.batches: list[list[Any]] = []
        self.sizes: list[int] = []  # what ``on_batch`` was told
        self.active = 0
        self.peak = 0
        self.fail_on = fail_on
        self._open = asyncio.Event()
        if not held:
            self._open.set()

    def open(self) -> None:
        self._open.set()

    def on_batch(self, size: int) -> None:
        self.sizes.append(size)

    async def __call__(self, payloads: Sequence[Any]) -> list[Any]:
        self.batches.append(list(payloads))
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await self._open.wait()
        finally:
            self.active -= 1
        if self.fail_on is not None and self.fail_on in payloads:
            raise RuntimeError(f"batch with {self.fail_on!r} failed")
        return [("result", p) for p in payloads]

    def batcher(self, **kwargs: Any) -> Batcher:
        options: dict[str, Any] = {
            "workers": 1,
            "max_batch": 4,
            "max_delay_s": LONG,
            "max_queue": 100,
        }
        options.update(kwargs)
        return Batcher(self, on_batch=self.on_batch, **options)


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (failing after :data:`TIMEOUT`)."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), TIMEOUT)


async def results(futures: Sequence[asyncio.Future[Any]]) -> list[Done]:
    return list(await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT))


async def turns(n: int = 20) -> None:
    """Give the loop a few iterations: enough for anything already runnable to run."""
    for _ in range(n):
        await asyncio.sleep(0)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


# ---------------------------------------------------------------------- when batches close


def test_full_batch_closes_without_waiting_for_the_delay() -> None:
    async def main() -> None:
        gate = Gate()
        batcher = gate.batcher(max_batch=3, max_delay_s=LONG)
        futures = [batcher.submit("k", i, None) for i in range(3)]
        # A 60 s delay would blow the 5 s bound: only reaching max_batch can close it.
        done = await results(futures)
        assert [d.batch_size for d in done] == [3, 3, 3]
        assert gate.batches == [[0, 1, 2]]
        assert gate.sizes == [3]
        assert batcher.queued == 0
        await batcher.close()

    run(main)


def test_a_batch_already_waiting_for_its_delay_closes_when_it_fills() -> None:
    async def main() -> None:
        gate = Gate()
        batcher = gate.batcher(max_batch=3, max_delay_s=LONG)
        futures = [batcher.submit("k", 0, None)]
        await turns()  # the lane now waits out the first job's 60 s delay
        assert gate.batches == []
        futures += [batcher.submit("k", i, None) for i in (1, 2)]
        done = await results(futures)
        assert [d.batch_size for d in done] == [3, 3, 3]
        assert gate.batches == [[0, 1, 2]]
        await batcher.close()

    run(main)


def test_partial_batch_closes_after_the_delay() -> None:
    async def main() -> None:
        gate = Gate()
        batcher = gate.batcher(max_batch=10, max_delay_s=SHORT)
        futures = [batcher.submit("k", i, None) for i in range(3)]
        done = await results(futures)
        # All three arrived before the loop ran once, so the oldest's timer closes them together.
        assert [d.batch_size for d in done] == [3, 3, 3]
        assert gate.batches == [[0, 1, 2]]
        assert gate.sizes == [3]
        await batcher.close()

    run(main)


def test_a_job_past_a_full_batch_waits_for_its_own_batch() -> None:
    async def main() -> None:
        gate = Gate()
        batcher = gate.batcher(max_batch=2, max_delay_s=LONG)
        futures = [batcher.submit("k", i, None) for i in range(3)]
        await results(futures[:2])
        await turns()
        # The third is alone and its delay is 60 s: it must still be queued, not run.
        assert not futures[2].done()
        assert gate.batches == [[0, 1]]
        assert batcher.queued == 1
        await batcher.close()
        with pytest.raises(BatcherClosedError):
            futures[2].result()

    run(main)


# ------------------------------------------------------------------------ who shares a batch


def test_jobs_with_different_keys_never_share_a_batch() -> None:
    async def main() -> None:
        gate = Gate()
        batcher = gate.batcher(workers=3, max_batch=10, max_delay_s=SHORT)
        keys = ["a", "b", "a", "c", "b", "a"]
        futures = [batcher.submit(key, (key, i), None) for i, key in enumerate(keys)]
        done = await results(futures)
        assert sorted(gate.batches) == [
            [("a", 0), ("a", 2), ("a", 5)],
            [("b", 1), ("b", 4)],
            [("c", 3)],
        ]
        assert [d.batch_size for d in done] == [3, 2, 3, 1, 2, 3]
        assert sorted(gate.sizes) == [1, 2, 3]
        await batcher.close()

    run(main)


def test_results_map_back_to_their_futures_in_order() -> None:
    async def main() -> None:
        async def shout(payloads: Sequence[str]) -> list[str]:
            return [p.upper() for p in payloads]

        batcher = Batcher(shout, workers=2, max_batch=3, max_delay_s=SHORT, max_queue=100)
        words = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
        futures = [batcher.submit(w[0] < "d", w, None) for w in words]  # two keys, interleaved
        done = await results(futures)
        assert [d.value for d in done] == [w.upper() for w in words]
        await batcher.close()

    run(main)


def test_queue_time_runs_from_submit_to_dispatch() -> None:
    async def main() -> None:
        gate = Gate(held=True)
        batcher = gate.batcher(workers=1, max_batch=1)
        before = time.monotonic()
        first = batcher.submit("k", 0, None)
        await until(lambda: len(gate.batches) == 1)
        second = batcher.submit("k", 1, None)
        submitted = time.monotonic()
        await turns()
        released = time.monotonic()
        gate.open()
        done = await results([first, second])
        elapsed = time.monotonic() - before
        assert all(0 <= d.queue_s <= elapsed for d in done)
        # The second job waited behind the first batch: at least until the gate opened.
        assert done[1].queue_s >= released - submitted
        assert [d.batch_size for d in done] == [1, 1]
        await batcher.close()

    run(main)


# ------------------------------------------------------------------------------ under load


def test_jobs_arriving_while_the_worker_is_busy_form_the_next_batch_together() -> None:
    async def main() -> None:
        gate = Gate(held=True)
        batcher = gate.batcher(workers=1, max_batch=10, max_delay_s=SHORT)
        first = batcher.submit("k", 0, None)
        await until(lambda: len(gate.batches) == 1)
        submitted = time.monotonic()
        later = [batcher.submit("k", i, None) for i in range(1, 4)]
        # Their delay runs out while the only worker is busy; they wait for it together.
        await until(lambda: time.monotonic() > submitted + SHORT)
        await turns()
        assert batcher.queued == 3
        gate.open()
        done = await results([first, *later])
        assert gate.batches == [[0], [1, 2, 3]]
        assert gate.sizes == [1, 3]
        assert [d.batch_size for d in done] == [1, 3, 3, 3]
        await batcher.close()

    run(main)


def test_growth_under_load_stops_at_max_batch() -> None:
    async def main() -> None:
        gate = Gate(held=True)
        batcher = gate.batcher(workers=1, max_batch=3, max_delay_s=SHORT)
        first = batcher.submit("k", 0, None)
        await until(lambda: len(gate.batches) == 1)
        later = [batcher.submit("k", i, None) for i in range(1, 6)]
        gate.open()
        await results([first, *later])
        assert gate.batches == [[0], [1, 2, 3], [4, 5]]
        assert gate.sizes == [1, 3, 2]
        await batcher.close()

    run(main)


def test_two_workers_run_two_batches_at_once() -> None:
    async def main() -> None:
        gate = Gate(held=True)
        batcher = gate.batcher(workers=2, max_batch=1)
        futures = [batcher.submit("k", i, None) for i in range(2)]
        await until(lambda: gate.active == 2)
        gate.open()
        await results(futures)
        assert gate.peak == 2
        await batcher.close()

    run(main)


def test_batches_ahead_are_handed_over_before_a_worker_frees() -> None:
    async def main() -> None:
        gate = Gate(held=True)
        batcher = gate.batcher(workers=1, ahead=1, max_batch=1)
        futures = [batcher.submit("k", i, None) for i in range(3)]
        # The second batch reaches the backend while the first still runs; the third waits.
        await until(lambda: gate.active == 2)
        await turns()
        assert gate.batches == [[0], [1]]
        gate.open()
        await results(futures)
        assert gate.batches == [[0], [1], [2]]
        assert gate.peak == 2
        await batcher.close()

    run(main)


def test_one_worker_runs_one_batch_at_a_time_across_keys() -> None:
    async def main() -> None:
        gate = Gate(held=True)
        batcher = gate.batcher(workers=1, max_batch=1)
        futures = [batcher.submit(key, key, None) for key in ("a", "b")]
        await until(lambda: gate.active == 1)
        await turns()
        # The worker slot is shared by every key: "b" waits although its batch is full.
        assert len(gate.batches) == 1
        gate.open()
        await results(futures)
        assert gate.peak == 1
        assert sorted(gate.sizes) == [1, 1]
        await batcher.close()

    run(main)


# ------------------------------------------------------------------------ the bounded queue


def test_queue_full_then_accepting_again_once_a_batch_is_dispatched() -> None:
    async def main() -> None:
        gate = Gate(held=True)
        batcher = gate.batcher(workers=1, max_batch=2, max_queue=2)
        futures = [batcher.submit("k", i, None) for i in range(2)]
        assert batcher.queued == 2
        with pytest.raises(QueueFullError):
            batcher.submit("k", 99, None)
        assert batcher.queued == 2  # a refused job takes no place
        # Dispatching frees the queue even while the batch still runs.
        await until(lambda: batcher.queued == 0)
        assert gate.active == 1
        futures += [batcher.submit("k", i, None) for i in range(2, 4)]
        with pytest.raises(QueueFullError):
            batcher.submit("k", 99, None)
        gate.open()
        done = await results(futures)
        assert [d.value for d in done] == [("result", i) for i in range(4)]
        assert all(99 not in batch for batch in gate.batches)
        await batcher.close()

    run(main)


def test_the_queue_bound_is_shared_by_all_keys() -> None:
    async def main() -> None:
        gate = Gate()
        batcher = gate.batcher(max_batch=10, max_queue=2)
        futures = [batcher.submit(key, key, None) for key in ("a", "b")]
        with pytest.raises(QueueFullError):
            batcher.submit("c", "c", None)
        await batcher.close()  # fails the two still collecting
        for future in futures:
            assert isinstance(future.exception(), BatcherClosedError)

    run(main)


# ------------------------------------------------------------------ deadlines, cancellations


def test_a_passed_deadline_fails_that_job_and_the_rest_of_its_batch_runs() -> None:
    async def main() -> None:
        gate = Gate()
        batcher = gate.batcher(max_batch=3)
        now = time.monotonic()
        futures = [
            batcher.submit("k", "none", None),
            batcher.submit("k", "past", now - 1.0),
            batcher.submit("k", "future", now + LONG),
        ]
        outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), TIMEOUT)
        assert isinstance(outcomes[1], DeadlinePassedError)
        assert isinstance(outcomes[1], TimeoutError)  # callers may catch the builtin
        kept = [outcomes[0], outcomes[2]]
        assert all(isinstance(d, Done) and d.batch_size == 2 for d in kept)
        assert [d.value for d in kept if isinstance(d, Done)] == [
            ("result", "none"),
            ("result", "future"),
        ]
        assert gate.batches == [["none", "future"]]
        assert gate.sizes == [2]
        await batcher.close()

    run(main)


def test_a_deadline_that_passes_while_waiting_for_a_worker() -> None:
    async def main() -> None:
        gate = Gate(held=True)
        batcher = gate.batcher(workers=1, max_batch=2, max_delay_s=SHORT)
        first = batcher.submit("k", "first", None)
        await until(lambda: len(gate.batches) == 1)
        deadline = time.monotonic() + SHORT
        late = batcher.submit("k", "late", deadline)
        patient = batcher.submit("k", "patient", None)
        # The only worker is held past the deadline: the job must not reach ``run``.
        await until(lambda: time.monotonic() > deadline)
        gate.open()
        await results([first, patient])
        with pytest.raises(DeadlinePassedError):
            await asyncio.wait_for(late, TIMEOUT)
        assert gate.batches == [["first"], ["patient"]]
        assert patient.result().batch_size == 1
        await batcher.close()

    run(main)


def test_a_cancelled_job_is_not_sent_to_run() -> None:
    async def main() -> None:
        gate = Gate(held=True)
        batcher = gate.batcher(workers=1, max_batch=3, max_delay_s=SHORT)
        first = batcher.submit("k", "first", None)
        await until(lambda: len(gate.batches) == 1)
        waiting = [batcher.submit("k", p, None) for p in ("keep", "drop", "also")]
        waiting[1].cancel()  # the caller gave up while its job was queued
        gate.open()
        done = await results([first, waiting[0], waiting[2]])
        assert gate.batches == [["first"], ["keep", "also"]]
        assert gate.sizes == [1, 2]
        assert [d.batch_size for d in done] == [1, 2, 2]
        await batcher.close()

    run(main)


def test_a_batch_of_only_cancelled_jobs_skips_run_and_frees_its_worker() -> None:
    async def main() -> None:
        gate = Gate()
        batcher = gate.batcher(workers=1, max_batch=2)
        for future in [batcher.submit("k", i, None) for i in range(2)]:
            future.cancel()
        await until(lambda: batcher.queued == 0)
        # The only worker slot must have come back, or this batch would never run.
        done = await results([batcher.submit("k", i, None) for i in (2, 3)])
        assert [d.value for d in done] == [("result", 2), ("result", 3)]
        assert gate.batches == [[2, 3]]
        assert gate.sizes == [2]
        await batcher.close()

    run(main)


# ------------------------------------------------------------------------------- failures


def test_a_failing_run_fails_only_its_batch_and_the_batcher_keeps_working() -> None:
    async def main() -> None:
        gate = Gate(fail_on="boom")
        batcher = gate.batcher(workers=1, max_batch=2)
        bad = [batcher.submit("x", p, None) for p in ("boom", "fine")]
        good = [batcher.submit("y", p, None) for p in ("ok1", "ok2")]
        outcomes = await asyncio.wait_for(asyncio.gather(*bad, return_exceptions=True), TIMEOUT)
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        assert outcomes[0] is outcomes[1]  # the batch's one failure, given to each of its jobs
        assert [d.value for d in await results(good)] == [("result", "ok1"), ("result", "ok2")]
        # The failed lane still collects, and its worker slot came back.
        again = [batcher.submit("x", p, None) for p in ("a", "b")]
        assert [d.value for d in await results(again)] == [("result", "a"), ("result", "b")]
        await batcher.close()

    run(main)


# ------------------------------------------------------------------------------- shutdown


def test_close_waits_for_the_running_batch() -> None:
    async def main() -> None:
        gate = Gate(held=True)
        batcher = gate.batcher(max_batch=1)
        future = batcher.submit("k", "job", None)
        await until(lambda: gate.active == 1)
        closing = asyncio.create_task(batcher.close())
        await turns()
        assert not closing.done()
        gate.open()
        await asyncio.wait_for(closing, TIMEOUT)
        assert future.result().value == ("result", "job")

    run(main)


def test_close_fails_jobs_whose_batch_has_not_closed() -> None:
    async def main() -> None:
        gate = Gate()
        batcher = gate.batcher(max_batch=10, max_delay_s=LONG)
        future = batcher.submit("k", "job", None)
        await turns()
        await asyncio.wait_for(batcher.close(), TIMEOUT)
        with pytest.raises(BatcherClosedError, match="stopped"):
            future.result()
        assert gate.batches == []

    run(main)


def test_close_refuses_later_jobs_and_counts_none() -> None:
    async def main() -> None:
        batcher = Gate().batcher(max_batch=10)
        batcher.submit("k", "job", None)
        await asyncio.wait_for(batcher.close(), TIMEOUT)
        assert batcher.queued == 0
        with pytest.raises(BatcherClosedError):
            batcher.submit("k", "late", None)

    run(main)


# ------------------------------------------------------------------- no caller is left hanging


def test_a_run_returning_too_few_results_fails_its_whole_batch() -> None:
    async def short(payloads: Sequence[Any]) -> list[Any]:
        return list(payloads)[:-1]

    async def main() -> None:
        batcher = Batcher(short, workers=1, max_batch=2, max_delay_s=LONG, max_queue=10)
        futures = [batcher.submit("k", p, None) for p in ("a", "b")]
        done = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), TIMEOUT)
        assert all(isinstance(d, RuntimeError) and "results" in str(d) for d in done)

    run(main)


def test_a_failing_on_batch_callback_fails_the_batch_not_the_batcher() -> None:
    def explode(size: int) -> None:
        raise ValueError("metrics broke")

    async def main() -> None:
        gate = Gate()
        batcher = Batcher(
            gate, workers=1, max_batch=1, max_delay_s=LONG, max_queue=10, on_batch=explode
        )
        with pytest.raises(ValueError, match="metrics broke"):
            await asyncio.wait_for(batcher.submit("k", "a", None), TIMEOUT)
        with pytest.raises(ValueError, match="metrics broke"):
            await asyncio.wait_for(batcher.submit("k", "b", None), TIMEOUT)

    run(main)


# ---------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "bad",
    [
        {"workers": 0},
        {"ahead": -1},
        {"max_batch": 0},
        {"max_queue": 0},
        {"max_delay_s": -0.001},
    ],
)
def test_constructor_rejects_out_of_range_settings(bad: dict[str, Any]) -> None:
    async def never(payloads: Sequence[Any]) -> list[Any]:
        raise AssertionError("not reached")

    options: dict[str, Any] = {"workers": 1, "max_batch": 1, "max_delay_s": 0.0, "max_queue": 1}
    Batcher(never, **options)  # the smallest valid settings are accepted
    with pytest.raises(ValueError):
        Batcher(never, **{**options, **bad})
