"""Answer a retried request once: a bounded cache of recent responses by request id.

A client that times out cannot tell whether its request was lost or its answer was; it
sends the same ``request_id`` again. The cache hands back the stored answer, and a retry
that arrives while the first attempt is still running waits for that attempt instead of
computing again. Keys are scoped by tenant, so one tenant cannot read another's answers by
guessing ids. Only successes are stored: a failure may be transient, and retrying it should
try again.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class _AbandonedError(Exception):
    """The first attempt was cancelled: a retry waiting on it must compute for itself."""


class ReusedIdError(ValueError):
    """A request id came back attached to a different request."""


class ResponseCache(Generic[T]):
    """LRU of ``max_entries`` finished responses plus the requests still in flight."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self._done: OrderedDict[tuple[str, str], tuple[bytes, T]] = OrderedDict()
        self._running: dict[tuple[str, str], tuple[bytes, asyncio.Future[T]]] = {}

    def __len__(self) -> int:
        return len(self._done)

    async def get_or_run(
        self, key: tuple[str, str], fingerprint: bytes, run: Callable[[], Awaitable[T]]
    ) -> tuple[T, bool]:
        """The response for ``key``, computing it with ``run`` unless known; and whether cached.

        ``fingerprint`` identifies the request's content; the same id with another
        fingerprint raises :class:`ReusedIdError` rather than return a stale answer.
        """
        while True:
            if key in self._done:
                stored_fp, value = self._done[key]
                self._check(stored_fp, fingerprint)
                self._done.move_to_end(key)
                return value, True
            if key not in self._running:
                return await self._run_first(key, fingerprint, run), False
            stored_fp, first = self._running[key]
            self._check(stored_fp, fingerprint)
            try:
                return await asyncio.shield(first), True
            except _AbandonedError:
                continue  # the first caller went away mid-computation: this one carries on

    async def _run_first(
        self, key: tuple[str, str], fingerprint: bytes, run: Callable[[], Awaitable[T]]
    ) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._running[key] = (fingerprint, future)
        try:
            value = await run()
        except asyncio.CancelledError:
            future.set_exception(_AbandonedError())
            future.exception()  # retrieved here, so an unawaited failure is not reported
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()
            raise
        finally:
            del self._running[key]
        future.set_result(value)
        self._store(key, fingerprint, value)
        return value

    @staticmethod
    def _check(stored: bytes, fingerprint: bytes) -> None:
        if stored != fingerprint:
            raise ReusedIdError("request_id was already used for a different request")

    def _store(self, key: tuple[str, str], fingerprint: bytes, value: T) -> None:
        if self.max_entries == 0:
            return
        self._done[key] = (fingerprint, value)
        while len(self._done) > self.max_entries:
            self._done.popitem(last=False)
