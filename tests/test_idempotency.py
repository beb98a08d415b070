"""The response cache: one answer per request id, shared by retries, scoped by tenant.

Concurrency is driven by a ``run`` that waits on an event the test sets, so "the first
attempt is still running" is a state the test holds, not a race it hopes to win.
"""

from __future__ import annotations

import asyncio
import random
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from tandem.cloud.idempotency import ResponseCache, ReusedIdError

TIMEOUT = 5.0  # a bound on any wait, so a hang fails instead of stalling the suite
FP = b"fingerprint-1"
OTHER_FP = b"fingerprint-2"


class Work:
    """A ``run`` factory that counts calls; each call may be held until :meth:`release`."""

    def __init__(self, *, held: bool = False, fail: BaseException | None = None) -> None:
        self.calls = 0
        self.running = 0
        self.fail = fail
        self._go = asyncio.Event()
        if not held:
            self._go.set()

    def release(self) -> None:
        self._go.set()

    def __call__(self, value: Any) -> Callable[[], Coroutine[Any, Any, Any]]:
        async def run() -> Any:
            self.calls += 1
            self.running += 1
            try:
                await self._go.wait()
            finally:
                self.running -= 1
            if self.fail is not None:
                raise self.fail
            return value

        return run


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (failing after :data:`TIMEOUT`)."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0)

    await asyncio.wait_for(poll(), TIMEOUT)


async def turns(n: int = 20) -> None:
    """Give the loop a few iterations: enough for anything already runnable to run."""
    for _ in range(n):
        await asyncio.sleep(0)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


# ------------------------------------------------------------------------------ hits, misses


def test_a_miss_runs_and_a_repeat_is_a_hit() -> None:
    async def main() -> None:
        cache: ResponseCache[str] = ResponseCache(8)
        work = Work()
        assert await cache.get_or_run(("t", "r1"), FP, work("answer")) == ("answer", False)
        # The retry's own ``run`` would answer differently: a hit must not call it.
        assert await cache.get_or_run(("t", "r1"), FP, work("recomputed")) == ("answer", True)
        assert work.calls == 1
        assert len(cache) == 1

    run(main)


def test_a_retry_during_the_first_attempt_waits_for_it() -> None:
    async def main() -> None:
        cache: ResponseCache[str] = ResponseCache(8)
        work = Work(held=True)
        first = asyncio.create_task(cache.get_or_run(("t", "r"), FP, work("answer")))
        await until(lambda: work.running == 1)
        retry = asyncio.create_task(cache.get_or_run(("t", "r"), FP, work("recomputed")))
        await turns()
        assert not retry.done()  # it waits on the first attempt rather than answering alone
        assert work.calls == 1
        work.release()
        assert await asyncio.wait_for(first, TIMEOUT) == ("answer", False)
        assert await asyncio.wait_for(retry, TIMEOUT) == ("answer", True)
        assert work.calls == 1
        assert len(cache) == 1

    run(main)


def test_many_concurrent_duplicates_share_one_run() -> None:
    async def main() -> None:
        cache: ResponseCache[int] = ResponseCache(8)
        work = Work(held=True)
        tasks = [asyncio.create_task(cache.get_or_run(("t", "r"), FP, work(i))) for i in range(5)]
        await until(lambda: work.running == 1)
        await turns()
        work.release()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
        # The first task to start owns the run; everyone gets its value.
        assert outcomes == [(0, False)] + [(0, True)] * 4
        assert work.calls == 1

    run(main)


# --------------------------------------------------------------------------- reused ids


def test_a_reused_id_with_another_request_is_refused_once_done() -> None:
    async def main() -> None:
        cache: ResponseCache[str] = ResponseCache(8)
        work = Work()
        await cache.get_or_run(("t", "r"), FP, work("answer"))
        with pytest.raises(ReusedIdError):
            await cache.get_or_run(("t", "r"), OTHER_FP, work("other"))
        assert work.calls == 1
        # The refusal leaves the stored answer in place for the genuine retry.
        assert await cache.get_or_run(("t", "r"), FP, work("x")) == ("answer", True)

    run(main)


def test_a_reused_id_with_another_request_is_refused_while_running() -> None:
    async def main() -> None:
        cache: ResponseCache[str] = ResponseCache(8)
        work = Work(held=True)
        first = asyncio.create_task(cache.get_or_run(("t", "r"), FP, work("answer")))
        await until(lambda: work.running == 1)
        # Refused at once: it neither waits for the first attempt nor starts its own.
        with pytest.raises(ReusedIdError):
            await asyncio.wait_for(cache.get_or_run(("t", "r"), OTHER_FP, work("x")), TIMEOUT)
        assert work.calls == 1
        assert not first.done()
        work.release()
        assert await asyncio.wait_for(first, TIMEOUT) == ("answer", False)

    run(main)


def test_reused_id_error_is_a_value_error() -> None:
    # The service maps it to INVALID_ARGUMENT; callers catching ValueError see it too.
    assert issubclass(ReusedIdError, ValueError)


# ------------------------------------------------------------------------------ failures


def test_a_failure_propagates_and_is_not_cached() -> None:
    async def main() -> None:
        cache: ResponseCache[str] = ResponseCache(8)
        failing = Work(fail=ValueError("transient"))
        with pytest.raises(ValueError, match="transient"):
            await cache.get_or_run(("t", "r"), FP, failing("never"))
        assert len(cache) == 0
        # A retry of a failure tries again, and its success is what gets stored.
        working = Work()
        assert await cache.get_or_run(("t", "r"), FP, working("answer")) == ("answer", False)
        assert working.calls == 1
        assert await cache.get_or_run(("t", "r"), FP, working("x")) == ("answer", True)

    run(main)


def test_a_failure_reaches_the_waiting_retry_too_and_the_next_call_runs_again() -> None:
    async def main() -> None:
        cache: ResponseCache[str] = ResponseCache(8)
        error = RuntimeError("backend down")
        work = Work(held=True, fail=error)
        first = asyncio.create_task(cache.get_or_run(("t", "r"), FP, work("never")))
        await until(lambda: work.running == 1)
        retry = asyncio.create_task(cache.get_or_run(("t", "r"), FP, work("never")))
        await turns()
        work.release()
        outcomes = await asyncio.wait_for(
            asyncio.gather(first, retry, return_exceptions=True), TIMEOUT
        )
        assert outcomes == [error, error]
        assert work.calls == 1
        later = Work()
        assert await cache.get_or_run(("t", "r"), FP, later("answer")) == ("answer", False)
        assert later.calls == 1

    run(main)


# ------------------------------------------------------------------------------- eviction


def test_eviction_drops_the_least_recently_used_entry() -> None:
    async def main() -> None:
        cache: ResponseCache[str] = ResponseCache(2)
        work = Work()

        async def get(request_id: str) -> bool:
            _, cached = await cache.get_or_run(("t", request_id), FP, work(request_id))
            return cached

        assert not await get("a")
        assert not await get("b")
        assert await get("a")  # a hit: "a" is now more recent than "b"
        assert not await get("c")  # over the bound: "b", the least recent, goes
        assert len(cache) == 2
        assert await get("a")
        assert await get("c")
        assert not await get("b")  # ran again; storing it evicts "a" (least recent now)
        assert await get("c")
        assert not await get("a")
        assert len(cache) == 2

    run(main)


def test_max_entries_zero_stores_nothing_but_still_joins_duplicates() -> None:
    async def main() -> None:
        cache: ResponseCache[str] = ResponseCache(0)
        work = Work()
        assert await cache.get_or_run(("t", "r"), FP, work("one")) == ("one", False)
        assert await cache.get_or_run(("t", "r"), FP, work("two")) == ("two", False)
        assert len(cache) == 0
        # In-flight requests are tracked regardless of the bound on finished ones.
        held = Work(held=True)
        tasks = [asyncio.create_task(cache.get_or_run(("t", "s"), FP, held(v))) for v in ("x", "y")]
        await until(lambda: held.running == 1)
        await turns()
        held.release()
        assert await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT) == [
            ("x", False),
            ("x", True),
        ]
        assert held.calls == 1
        assert len(cache) == 0

    run(main)


def test_negative_max_entries_is_refused() -> None:
    with pytest.raises(ValueError):
        ResponseCache(-1)
    with pytest.raises(ValueError):
        ResponseCache(8, -1, len)
    with pytest.raises(ValueError, match="together"):
        ResponseCache(8, 1024)


def _fill(cache: ResponseCache[bytes], n: int, value_bytes: int) -> None:
    rng = random.Random(0)

    async def main() -> None:
        for i in range(n):
            value = rng.randbytes(value_bytes)
            key = (f"tenant-{i % 3}", f"request-{i:06d}")
            await cache.get_or_run(key, rng.randbytes(32), lambda v=value: _now(v))

    asyncio.run(main())


async def _now(value: bytes) -> bytes:
    return value


def test_byte_bound_holds_in_real_memory() -> None:
    """Fed 8 MB of 4 KB answers, a 1 MiB cache holds under 1 MiB (tracemalloc, not its word)."""
    cap = 1 << 20
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache: ResponseCache[bytes] = ResponseCache(1_000_000, cap, len)
        _fill(cache, 2000, 4096)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cache.nbytes <= cap
    assert held <= cap, f"{held} bytes held"
    # Full, not empty: the newest answers are kept, up to the bound.
    assert len(cache) == cap // cache.cost(("tenant-0", "request-000000"), FP * 3, b"x" * 4096)


def test_byte_bound_evicts_the_oldest_and_skips_an_oversized_answer() -> None:
    async def main() -> None:
        cache: ResponseCache[bytes] = ResponseCache(100, 2500, len)
        for name in ("a", "b", "c"):
            await cache.get_or_run(("t", name), FP, lambda: _now(b"x" * 500))
        assert len(cache) == 2  # each costs 500 + overhead: a third does not fit
        assert (await cache.get_or_run(("t", "b"), FP, lambda: _now(b"new")))[1]
        assert not (await cache.get_or_run(("t", "a"), FP, lambda: _now(b"y" * 500)))[1]
        await cache.get_or_run(("t", "huge"), FP, lambda: _now(b"z" * 5000))
        assert ("t", "huge") not in cache._done and len(cache) == 2
        assert cache.nbytes == sum(cache.cost(k, fp, v) for k, (fp, v) in cache._done.items())

    asyncio.run(main())


# --------------------------------------------------------------------------- cancellation


def test_a_retry_waiting_on_a_cancelled_first_attempt_computes_for_itself() -> None:
    async def main() -> None:
        cache: ResponseCache[str] = ResponseCache(8)
        held = Work(held=True)
        first = asyncio.create_task(cache.get_or_run(("t", "r"), FP, held("never")))
        await until(lambda: held.running == 1)
        own = Work()
        retry = asyncio.create_task(cache.get_or_run(("t", "r"), FP, own("answer")))
        await turns()
        first.cancel()  # the first client went away; the retrying one still wants an answer
        assert await asyncio.wait_for(retry, TIMEOUT) == ("answer", False)
        with pytest.raises(asyncio.CancelledError):
            await first
        assert (held.calls, own.calls) == (1, 1)
        assert await cache.get_or_run(("t", "r"), FP, Work()("other")) == ("answer", True)

    run(main)


def test_cancelling_a_waiter_leaves_the_first_attempt_running() -> None:
    async def main() -> None:
        cache: ResponseCache[str] = ResponseCache(8)
        work = Work(held=True)
        first = asyncio.create_task(cache.get_or_run(("t", "r"), FP, work("answer")))
        await until(lambda: work.running == 1)
        retry = asyncio.create_task(cache.get_or_run(("t", "r"), FP, work("x")))
        await turns()
        retry.cancel()  # the retrying client gave up; the first client still wants its answer
        with pytest.raises(asyncio.CancelledError):
            await retry
        assert not first.done()
        work.release()
        assert await asyncio.wait_for(first, TIMEOUT) == ("answer", False)
        assert await cache.get_or_run(("t", "r"), FP, work("x")) == ("answer", True)
        assert work.calls == 1

    run(main)


# -------------------------------------------------------------------------------- tenants


def test_the_same_id_under_two_tenants_is_two_entries() -> None:
    async def main() -> None:
        cache: ResponseCache[str] = ResponseCache(8)
        work = Work()
        # Different requests under one id, but each tenant's own: no ReusedIdError.
        assert await cache.get_or_run(("alice", "r"), FP, work("for alice")) == (
            "for alice",
            False,
        )
        assert await cache.get_or_run(("bob", "r"), OTHER_FP, work("for bob")) == (
            "for bob",
            False,
        )
        assert work.calls == 2
        assert len(cache) == 2
        # Each tenant reads back its own answer...
        assert await cache.get_or_run(("alice", "r"), FP, work("x")) == ("for alice", True)
        assert await cache.get_or_run(("bob", "r"), OTHER_FP, work("x")) == ("for bob", True)
        # ...and a third tenant guessing the id, even with alice's fingerprint, reads nothing.
        assert await cache.get_or_run(("carol", "r"), FP, work("for carol")) == (
            "for carol",
            False,
        )
        assert work.calls == 3

    run(main)
