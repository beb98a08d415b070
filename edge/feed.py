"""Reading a source without blocking the daemon, and without holding inputs back.

A source may block for as long as it likes (stdin waits for its producer), so it is read on
a thread of its own. That thread is a daemon thread: a stop signal must not wait for a
producer that never writes again. Items reach the event loop through a bounded queue, which
is the back-pressure on the reader. :meth:`SourceFeed.chunk` hands out whatever has arrived,
up to a batch, as soon as there is at least one item: under load, inputs of a source read
ahead are batched, and a trickle is spooled one at a time instead of waiting for a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from tandem.edge.sources import Item

DRAIN_WAIT_S = 0.5
"""How long :meth:`SourceFeed.drain` waits for the reader to queue the item it holds."""


@dataclass(frozen=True)
class _End:
    """The source is exhausted, or failed with ``error``."""

    error: BaseException | None = None


class SourceFeed:
    """Items of ``items``, read on a daemon thread, handed out in chunks on the event loop."""

    def __init__(self, items: Iterator[Item], maxsize: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Item | _End] = asyncio.Queue(maxsize)
        self._ended: _End | None = None
        self._halt = threading.Event()  # drain(): read nothing more
        self._halted = threading.Event()  # the reader has queued its last item
        threading.Thread(target=self._read, args=(items,), daemon=True, name="source").start()

    def _read(self, items: Iterator[Item]) -> None:
        end = _End()
        try:
            while not self._halt.is_set():
                item = next(items, None)
                if item is None:
                    break
                self._put(item)
        except Exception as exc:  # handed to the loop, which fails the run with it
            end = _End(exc)
        finally:
            self._halted.set()
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._put(end)

    def _put(self, value: Item | _End) -> None:
        put = self._queue.put(value)
        try:
            future = asyncio.run_coroutine_threadsafe(put, self._loop)
        except RuntimeError:  # the loop has closed
            put.close()
            raise
        future.result()

    async def chunk(self, limit: int, stop: asyncio.Event) -> list[Item]:
        """At least one item (waiting for it), at most ``limit``; [] at the end or on ``stop``.

        Raises:
            Exception: whatever the source raised.
        """
        if self._ended is None:
            first = await self._first(stop)
            if first is not None:
                items = [first]
                while len(items) < limit and not self._queue.empty():
                    value = self._queue.get_nowait()
                    if isinstance(value, _End):
                        self._ended = value
                        break
                    items.append(value)
                return items
        if self._ended is not None and self._ended.error is not None:
            raise self._ended.error
        return []

    async def drain(self) -> list[Item]:
        """Stop reading; return the items read but not handed out yet.

        Includes an item the reader holds, waiting for room in the queue. A reader blocked
        in the source itself (stdin with nothing written) holds nothing and is left there.
        """
        self._halt.set()
        items = self._take_queued()
        # The loop must keep running meanwhile: the reader's last put goes through it.
        await asyncio.to_thread(self._halted.wait, DRAIN_WAIT_S)
        return items + self._take_queued()

    def _take_queued(self) -> list[Item]:
        items = []
        while not self._queue.empty():
            value = self._queue.get_nowait()
            if isinstance(value, _End):
                self._ended = value
            else:
                items.append(value)
        return items

    async def _first(self, stop: asyncio.Event) -> Item | None:
        getting = asyncio.ensure_future(self._queue.get())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not getting.done():
            getting.cancel()
            return None
        value = getting.result()
        if isinstance(value, _End):
            self._ended = value
            return None
        return value
