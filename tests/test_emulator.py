"""The link emulator: a TCP proxy whose timing matches the link model, for any protocol."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from serving import ROOT, TANDEM, config, make_repo, requests_for, running

from tandem.data import load_data
from tandem.edge.client import CloudClient
from tandem.sim.emulator import LinkEmulator
from tandem.sim.link import Link, transfer_s
from tandem.sim.traces import constant, read_pair

MAHIMAHI = ROOT.parent / "shared" / "traces" / "mahimahi"
PAIRS = ["ATT-LTE-driving-2016", "Verizon-LTE-short", "TMobile-UMTS-driving"]
MB = 1_000_000
TIMEOUT = 60.0


class Sink:
    """An upstream server that swallows what it gets and can answer with ``reply`` bytes."""

    def __init__(self, emulator_clock: list[LinkEmulator], reply: int = 0) -> None:
        self.received = 0
        self.last_byte_at = 0.0
        self.reply = reply
        self._clock = emulator_clock
        self.server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return "127.0.0.1", int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.reply:
            writer.write(b"r" * self.reply)
            await writer.drain()
        while chunk := await reader.read(1 << 16):
            self.received += len(chunk)
            self.last_byte_at = self._clock[0].now()
        writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@asynccontextmanager
async def emulated(up: Link, down: Link, reply: int = 0, **kw: int) -> AsyncIterator[tuple]:
    clock: list[LinkEmulator] = []
    sink = Sink(clock, reply)
    emulator = LinkEmulator(up, down, await sink.start(), **kw)
    clock.append(emulator)
    await emulator.start()
    try:
        yield emulator, sink
    finally:
        await emulator.close()
        await sink.close()


async def _push(emulator: LinkEmulator, sink: Sink, nbytes: int) -> tuple[float, float]:
    """Send ``nbytes`` through the emulator; (link time sent, link time the sink had them)."""
    assert emulator.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", emulator.port)
    sent_at = emulator.now()
    writer.write(b"x" * nbytes)
    await writer.drain()
    writer.write_eof()
    await asyncio.wait_for(reader.read(), TIMEOUT)  # the sink closes once it has everything
    writer.close()
    return sent_at, sink.last_byte_at


@pytest.mark.parametrize("name", PAIRS)
def test_pushing_1mb_takes_what_the_link_model_predicts(name: str) -> None:
    if not MAHIMAHI.is_dir():
        pytest.skip("../shared/traces is not here")
    pair = read_pair(MAHIMAHI / name)

    async def main() -> tuple[float, float]:
        async with emulated(Link(pair.up, 0.02), Link(pair.down, 0.02)) as (emulator, sink):
            sent_at, done_at = await _push(emulator, sink, MB)
            assert sink.received == MB
        return done_at - sent_at, transfer_s(pair.up, sent_at, MB, 0.02)

    measured, predicted = asyncio.run(main())
    print(f"{name}: 1 MB up in {measured:.3f} s, link model {predicted:.3f} s")
    assert abs(measured - predicted) <= 0.10 * predicted


def test_the_downlink_shapes_what_the_server_sends() -> None:
    async def main() -> tuple[float, float]:
        down = constant(2.0)  # 250 kB/s: 200 kB take 0.8 s
        async with emulated(Link(constant(100.0)), Link(down, 0.05), reply=200_000) as (em, _):
            assert em.port is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", em.port)
            start = em.now()
            got = 0
            while got < 200_000:
                got += len(await asyncio.wait_for(reader.read(1 << 16), TIMEOUT))
            writer.close()
            return em.now() - start, transfer_s(down, start, 200_000, 0.05)

    measured, predicted = asyncio.run(main())
    assert abs(measured - predicted) <= 0.10 * predicted


def test_concurrent_connections_queue_on_one_link() -> None:
    async def main() -> tuple[list[float], float]:
        up = constant(4.0)  # 500 kB/s
        async with emulated(Link(up), Link(constant(100.0))) as (emulator, sink):
            ends = await asyncio.gather(*(_push(emulator, sink, 250_000) for _ in range(2)))
            assert sink.received == 500_000
            start = min(s for s, _ in ends)
            return [e - start for _, e in ends], transfer_s(up, start, 500_000)

    finished, both = asyncio.run(main())
    # Sharing the link, the later of the two ends when 500 kB would, not when 250 kB would.
    assert abs(max(finished) - both) <= 0.10 * both
    assert min(finished) >= 0.45 * both


def test_the_emulator_counts_the_bytes_it_delivers_each_way() -> None:
    async def main() -> dict[str, int]:
        fast = Link(constant(100.0))
        async with emulated(fast, Link(constant(100.0)), reply=3_000) as (emulator, sink):
            assert emulator.port is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", emulator.port)
            writer.write(bytes(12_345))
            await writer.drain()
            got = 0
            while got < 3_000:
                got += len(await asyncio.wait_for(reader.read(1 << 16), TIMEOUT))
            while sink.received < 12_345:
                await asyncio.sleep(0.01)
            writer.close()
            return dict(emulator.delivered)

    assert asyncio.run(main()) == {"up": 12_345, "down": 3_000}


def test_a_full_queue_stops_reading_the_sender() -> None:
    async def main() -> int:
        slow = Link(constant(0.8))  # 100 kB/s
        limit = 64 * 1024
        async with emulated(slow, Link(constant(100.0)), max_queue_bytes=limit) as (em, _):
            assert em.port is not None
            _, writer = await asyncio.open_connection("127.0.0.1", em.port)
            writer.write(b"x" * 4 * MB)  # far more than the link carries in the test's time
            peak = 0
            for _ in range(20):
                await asyncio.sleep(0.02)
                peak = max(peak, em.queued_bytes)
            writer.close()
            return peak

    peak = asyncio.run(main())
    assert 0 < peak <= 64 * 1024 + 64 * 1024  # the limit plus at most one read


def test_an_unreachable_upstream_closes_the_client() -> None:
    async def main() -> bytes:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()  # nothing listens there now
        emulator = LinkEmulator(Link(constant(10.0)), Link(constant(10.0)), ("127.0.0.1", port))
        await emulator.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", emulator.port)
            data = await asyncio.wait_for(reader.read(), TIMEOUT)
            writer.close()
            return data
        finally:
            await emulator.close()

    assert asyncio.run(main()) == b""


def test_grpc_inference_through_the_emulator(tmp_path: Path, digits_bundle: Path) -> None:
    repo = make_repo(tmp_path, digits_bundle)
    request = requests_for(digits_bundle, load_data("digits").test.x[:1], 0.5, 4)[0]

    async def main() -> tuple[float, int]:
        async with running(config(repo)) as server:
            host, port = server.address.rsplit(":", 1)
            link_up, link_down = Link(constant(20.0), 0.03), Link(constant(20.0), 0.03)
            emulator = LinkEmulator(link_up, link_down, (host, int(port)))
            await emulator.start()
            try:
                async with CloudClient(f"127.0.0.1:{emulator.port}") as client:
                    await client.infer(request)  # connection set-up, not measured
                    request.request_id = "second"
                    start = emulator.now()
                    reply = await client.infer(request)
                    return emulator.now() - start, len(reply.response.top)
            finally:
                await emulator.close()

    elapsed, answers = asyncio.run(main())
    assert answers >= 1
    assert elapsed >= 0.06, "a request and its answer each cross 30 ms of delay"


def test_cli_reports_listening_and_exits_on_sigterm() -> None:
    cmd = [*TANDEM, "sim", "emulate", "--json", "--uplink", "const:5", "--downlink", "const:10"]
    cmd += ["--delay-ms", "20", "--upstream", "127.0.0.1:9"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "listening"
        assert ready["uplink"]["mean_mbps"] == pytest.approx(5.0)
        assert ready["downlink"]["mean_mbps"] == pytest.approx(10.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_cli_rejects_a_bad_trace_in_one_line() -> None:
    cmd = [*TANDEM, "sim", "emulate", "--uplink", "nope:1", "--downlink", "const:1"]
    out = subprocess.run([*cmd, "--upstream", "127.0.0.1:9"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith("tandem: error: no trace file 'nope:1'")
    assert out.stderr.count("\n") == 1
