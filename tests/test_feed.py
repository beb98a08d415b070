"""Reading a source on its own thread: chunks, back-pressure, failures, and a clean stop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from tandem.edge.feed import SourceFeed
from tandem.edge.sources import Item

TIMEOUT = 10.0


def _items(n: int, taken: list[int], gate: threading.Event | None = None) -> Iterator[Item]:
    for i in range(n):
        if gate is not None and i > 0:
            gate.wait(TIMEOUT)
        taken.append(i)
        yield Item(i, np.zeros((1, 2, 2), np.uint8), None)


def test_chunks_hand_out_everything_in_order() -> None:
    async def main() -> list[int]:
        feed = SourceFeed(_items(10, []), maxsize=4)
        stop, seen = asyncio.Event(), []
        while chunk := await asyncio.wait_for(feed.chunk(3, stop), TIMEOUT):
            assert 1 <= len(chunk) <= 3
            seen += [i.index for i in chunk]
        return seen

    assert asyncio.run(main()) == list(range(10))


def test_one_item_is_handed_out_without_waiting_for_a_chunk_to_fill() -> None:
    gate = threading.Event()  # the source gives one item, then blocks

    async def main() -> list[int]:
        feed = SourceFeed(_items(5, [], gate), maxsize=1)
        chunk = await asyncio.wait_for(feed.chunk(32, asyncio.Event()), TIMEOUT)
        gate.set()
        return [i.index for i in chunk]

    assert asyncio.run(main()) == [0]


def test_stop_returns_an_empty_chunk_while_the_source_blocks() -> None:
    gate = threading.Event()

    async def main() -> list[Item]:
        feed = SourceFeed(_items(5, [], gate), maxsize=1)
        stop = asyncio.Event()
        await feed.chunk(1, stop)
        stop.set()
        try:
            return await asyncio.wait_for(feed.chunk(1, stop), TIMEOUT)
        finally:
            gate.set()

    assert asyncio.run(main()) == []


def test_drain_returns_every_item_taken_from_the_source() -> None:
    taken: list[int] = []

    async def main() -> list[int]:
        feed = SourceFeed(_items(100, taken), maxsize=1)
        first = await feed.chunk(1, asyncio.Event())
        rest = await asyncio.wait_for(feed.drain(), TIMEOUT)
        return [i.index for i in [*first, *rest]]

    handed_out = asyncio.run(main())
    assert handed_out == taken, "nothing read from the source is dropped"
    assert len(taken) < 100, "the reader stopped reading"


def test_a_failing_source_fails_the_chunk_that_reaches_its_end() -> None:
    def broken() -> Iterator[Item]:
        yield Item(0, np.zeros((1, 2, 2), np.uint8), None)
        raise OSError("disk gone")

    async def main() -> None:
        feed = SourceFeed(broken(), maxsize=4)
        stop = asyncio.Event()
        got = []
        with pytest.raises(OSError, match="disk gone"):
            while chunk := await asyncio.wait_for(feed.chunk(8, stop), TIMEOUT):
                got += chunk
        assert [i.index for i in got] == [0]

    asyncio.run(main())
