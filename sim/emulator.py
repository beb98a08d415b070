"""A trace-driven TCP proxy: a userspace Mahimahi for any TCP protocol, gRPC included.

Clients connect to the emulator, which connects to the upstream server and relays bytes in
both directions. Every byte a client sends crosses the uplink :class:`~sim.link.Link`, every
byte the server sends back crosses the downlink: the proxy holds each 1,500-byte segment until
the link model says it arrives. One link per direction serves all connections, so concurrent
transfers queue behind each other as they would on one radio link. The links' clock starts
when the emulator starts, as a Mahimahi shell's does.

Memory stays bounded: a direction holding ``max_queue_bytes`` stops reading its sender until
segments are delivered, and TCP's own flow control pushes back from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tandem.sim.link import Link
from tandem.sim.traces import PACKET_BYTES

log = logging.getLogger(__name__)

READ_BYTES = 64 * 1024
MAX_QUEUE_BYTES = 4 * 1024 * 1024


@dataclass(eq=False)
class _Direction:
    """Segments on their way through one direction of one connection."""

    segments: deque[tuple[float, bytes]] = field(default_factory=deque)  # (arrival, bytes)
    queued: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False


class LinkEmulator:
    """Relays TCP from ``listen`` to ``upstream``, shaped by an uplink and a downlink."""

    def __init__(
        self,
        up: Link,
        down: Link,
        upstream: tuple[str, int],
        listen: tuple[str, int] = ("127.0.0.1", 0),
        *,
        max_queue_bytes: int = MAX_QUEUE_BYTES,
    ) -> None:
        """Nothing is bound until :meth:`start`."""
        self.up, self.down, self.upstream, self.listen = up, down, upstream, listen
        self.max_queue_bytes = max_queue_bytes
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._epoch = 0.0
        self._connections: set[asyncio.Task[None]] = set()
        self._directions: set[_Direction] = set()
        self.delivered = {"up": 0, "down": 0}
        """Bytes delivered so far in each direction, over every connection: what crossed
        the emulated socket, TCP payload with every HTTP/2 and gRPC frame included."""

    @property
    def queued_bytes(self) -> int:
        """Bytes read from senders and not yet delivered, over every open connection."""
        return sum(way.queued for way in self._directions)

    def now(self) -> float:
        """Seconds on the links' clock (0 when the emulator started)."""
        return asyncio.get_running_loop().time() - self._epoch

    async def start(self) -> int:
        """Bind the listening socket and start the links' clock; returns the bound port."""
        self._server = await asyncio.start_server(self._accept, *self.listen)
        self._epoch = asyncio.get_running_loop().time()
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening and cut every open connection."""
        if self._server is not None:
            self._server.close()
        # Connections first: from Python 3.12.1 wait_closed() waits for every client to leave.
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            pass  # close() cut the connection; asyncio's stream callback expects a plain end
        finally:
            self._connections.discard(task)

    async def _relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        try:
            server_in, server_out = await asyncio.open_connection(*self.upstream)
        except OSError as exc:
            log.warning("upstream %s:%s refused the connection: %s", *self.upstream, exc)
            await _close(client_out)
            return
        try:
            async with asyncio.TaskGroup() as both:  # one side failing ends the other
                both.create_task(self._pump(client_in, server_out, self.up, "up"))
                both.create_task(self._pump(server_in, client_out, self.down, "down"))
        except* (ConnectionError, OSError) as failed:
            log.debug("connection ended: %s", failed.exceptions)
        finally:
            await _close(client_out)
            await _close(server_out)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link, side: str
    ) -> None:
        way = _Direction()
        self._directions.add(way)
        try:
            await self._forward(reader, writer, link, way, side)
        finally:
            self._directions.discard(way)

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: Link,
        way: _Direction,
        side: str,
    ) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._deliver(way, writer, side))
            try:
                while chunk := await reader.read(READ_BYTES):
                    self._enqueue(way, link, chunk)
                    while way.queued >= self.max_queue_bytes:
                        way.changed.clear()
                        await way.changed.wait()
            finally:
                way.ended = True
                way.changed.set()

    def _enqueue(self, way: _Direction, link: Link, chunk: bytes) -> None:
        starts = range(0, len(chunk), PACKET_BYTES)
        sizes = np.array([min(PACKET_BYTES, len(chunk) - s) for s in starts])
        arrivals = link.send_many(np.full(len(sizes), self.now()), sizes)
        for start, arrival in zip(starts, arrivals.tolist(), strict=True):
            way.segments.append((arrival, chunk[start : start + PACKET_BYTES]))
        way.queued += len(chunk)
        way.changed.set()

    async def _deliver(self, way: _Direction, writer: asyncio.StreamWriter, side: str) -> None:
        while True:
            if not way.segments:
                if way.ended:
                    if writer.can_write_eof() and not writer.is_closing():
                        writer.write_eof()  # the sender finished: so does the receiver's side
                    return
                way.changed.clear()
                await way.changed.wait()
                continue
            wait = way.segments[0][0] - self.now()
            if wait > 0:
                await asyncio.sleep(wait)
            due = self.now()
            out = []
            while way.segments and way.segments[0][0] <= due:
                out.append(way.segments.popleft()[1])
            data = b"".join(out)
            way.queued -= len(data)
            way.changed.set()
            self.delivered[side] += len(data)
            writer.write(data)
            await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()
