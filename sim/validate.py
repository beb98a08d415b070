"""Prediction against reality: the real daemon and service over the emulator, and the simulator.

:func:`run_real` has ``tandem cloud serve`` and ``tandem edge run`` started as processes (by
the :class:`Wiring` it is given: the command line's, the one place roles are put together),
puts the emulator between them, and feeds the daemon inputs on its stdin at a fixed rate, recording
when each was fed on the links' clock and the latency the daemon reports for it.
:func:`predict` simulates the same inputs, fed at the same moments, over the same traces.

The daemon spends time on each request that no model of the network or the tail explains:
durable spooling, gRPC, hand-offs between its threads. :func:`calibrate` measures it once over
an unconstrained link (the median real latency minus the simulated one), and the profile
carries it as ``send_overhead_ms``: a property of the edge software on this machine, like the
head's compute time, measured, not fitted to the trace being predicted. The same run counts
what crossed the emulator's sockets, so the profile also carries the HTTP/2 and gRPC framing
per request (``frame_overhead_bytes``, beyond the protobuf message) and the bytes per answer
down (``response_bytes``): the simulated links carry what the real ones do.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from tandem.bundle import copy_bundle
from tandem.sim.des import Device, Strategy, simulate
from tandem.sim.emulator import LinkEmulator
from tandem.sim.link import Link
from tandem.sim.profiles import BundleProfile, device_class
from tandem.sim.scenario import SplitPoint
from tandem.sim.traces import TracePair, constant

WORKERS, MAX_BATCH, MAX_DELAY_MS = 1, 32, 2.0  # the service's batching, real and simulated
SERVE_FLAGS = [
    "--workers", str(WORKERS), "--max-batch", str(MAX_BATCH), "--max-delay-ms", str(MAX_DELAY_MS)
]  # fmt: skip
UNCONSTRAINED = TracePair(constant(10_000.0), constant(10_000.0))
CALIBRATION_INPUTS, CALIBRATION_FPS = 30, 20.0  # enough for a stable median, 1.5 s of feed
START_S = 120.0  # for a process to start and answer its first input
TAIL_S = 600.0  # for the last answers to come back after the last input was fed


class Wiring(Protocol):
    """Starts the real roles; :class:`tandem.cli.Processes` is the one implementation."""

    def service(self, repo: Path, *flags: str) -> AbstractAsyncContextManager[str]:
        """``tandem cloud serve`` over ``repo`` on a free loopback port, with ``flags``;
        yields its address and stops it on exit."""
        ...

    def daemon(
        self, bundle: Path, cloud: str, *flags: str, stdin: bool = False
    ) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
        """``tandem edge run --json`` of ``bundle`` against ``cloud``, with ``flags`` (and a
        pipe to its stdin with ``stdin``); stopped on exit if it is still running."""
        ...


@dataclass
class Measured:
    """One real run: when each input was fed (links' clock) and what the daemon reported."""

    fed_s: np.ndarray
    latency_ms: np.ndarray
    bytes_sent: float
    socket_up: float = 0.0
    """Bytes per input that crossed the uplink socket (every input, the unmeasured first too,
    so the connection's set-up is shared among them)."""
    socket_down: float = 0.0


async def run_real(
    bundle: Path,
    pair: TracePair,
    delay_ms: float,
    x: np.ndarray,
    fps: float,
    split: SplitPoint,
    workdir: Path,
    wiring: Wiring,
) -> Measured:
    """Serve ``x`` (uint8 inputs, fed at ``fps``) through the emulated link; see the module."""
    repo = workdir / "repo"
    if not (repo / bundle.name).exists():
        copy_bundle(bundle, repo)
    async with wiring.service(repo, *SERVE_FLAGS) as address:
        host, port = address.rsplit(":", 1)
        up, down = Link(pair.up, delay_ms / 1000), Link(pair.down, delay_ms / 1000)
        emulator = LinkEmulator(up, down, (host, int(port)))
        await emulator.start()
        try:
            measured = await _feed(bundle, emulator, x, fps, split, workdir, wiring)
        finally:
            await emulator.close()
        n = len(x)
        return replace(
            measured,
            socket_up=emulator.delivered["up"] / n,
            socket_down=emulator.delivered["down"] / n,
        )


async def _feed(
    bundle: Path,
    emulator: LinkEmulator,
    x: np.ndarray,
    fps: float,
    split: SplitPoint,
    workdir: Path,
    wiring: Wiring,
) -> Measured:
    sink = workdir / "sink.jsonl"
    for path in (sink, Path(f"{sink}.spool")):
        path.unlink(missing_ok=True)
    async with wiring.daemon(
        bundle, f"127.0.0.1:{emulator.port}", "--source", "-", "--sink", str(sink),
        *split.daemon_args(), "--no-fallback", stdin=True,
    ) as proc:  # fmt: skip
        assert proc.stdin is not None
        # One unmeasured input first: the daemon starts up and connects before the clock runs.
        await _write(proc, x[0])
        await asyncio.wait_for(_first_answer(proc, sink), START_S)
        start, fed = emulator.now() + 0.1, []
        for i, item in enumerate(x[1:]):
            await asyncio.sleep(max(0.0, start + i / fps - emulator.now()))
            fed.append(emulator.now())
            await _write(proc, item)
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), TAIL_S)
    rows = sorted((json.loads(line) for line in sink.read_text().splitlines()[1:]),
                  key=lambda r: r["input_index"])  # fmt: skip
    if len(rows) != len(fed) or any("error" in r for r in rows):
        raise RuntimeError(f"the daemon answered {len(rows)} of {len(fed)} inputs cleanly")
    return Measured(
        np.asarray(fed),
        np.asarray([r["latency_ms"] for r in rows]),
        float(np.mean([r["bytes_sent"] for r in rows])),
    )


def predict(
    profile: BundleProfile,
    measured: Measured,
    pair: TracePair,
    delay_ms: float,
    split: SplitPoint,
    device: str = "host",
) -> np.ndarray:
    """Simulated latencies (ms) of the inputs of ``measured``: fed at the same moments, with
    the request size the daemon reported sending and the profile's framing around it."""
    up_bytes = measured.bytes_sent + profile.frame_overhead_bytes
    strategy = Strategy("split", up_bytes=up_bytes, width=split.width)
    dev = Device(
        device_class(device).device(profile), pair.up, pair.down, delay_ms=delay_ms,
        times=tuple(measured.fed_s.tolist()),
    )  # fmt: skip
    horizon = float(measured.fed_s[-1]) + TAIL_S  # long enough for every answer to come back
    cloud = profile.cloud(WORKERS, MAX_BATCH, MAX_DELAY_MS)
    out = simulate([dev], cloud, strategy, horizon, response_bytes=profile.answer_bytes())
    return out.latency_s * 1000


async def calibrate(
    profile: BundleProfile,
    bundle: Path,
    x: np.ndarray,
    split: SplitPoint,
    workdir: Path,
    wiring: Wiring,
) -> BundleProfile:
    """``profile`` with ``send_overhead_ms``, ``frame_overhead_bytes`` and ``response_bytes``
    measured over an unconstrained link, on the first :data:`CALIBRATION_INPUTS` of ``x``
    (plus the unmeasured first one)."""
    inputs = x[: CALIBRATION_INPUTS + 1]
    measured = await run_real(
        bundle, UNCONSTRAINED, 0.0, inputs, CALIBRATION_FPS, split, workdir, wiring
    )
    base = profile.model_copy(
        update={
            "send_overhead_ms": 0.0,
            "frame_overhead_bytes": max(0.0, measured.socket_up - measured.bytes_sent),
            "response_bytes": measured.socket_down or None,
        }
    )
    simulated = predict(base, measured, UNCONSTRAINED, 0.0, split)
    overhead = max(0.0, float(np.median(measured.latency_ms) - np.median(simulated)))
    return base.model_copy(update={"send_overhead_ms": overhead})


async def _write(proc: asyncio.subprocess.Process, item: np.ndarray) -> None:
    assert proc.stdin is not None
    proc.stdin.write((json.dumps({"input": item.tolist()}) + "\n").encode())
    await proc.stdin.drain()


async def _first_answer(proc: asyncio.subprocess.Process, sink: Path) -> None:
    while not sink.is_file() or b"\n" not in sink.read_bytes():
        if proc.returncode is not None:
            raise RuntimeError(f"the edge daemon exited with {proc.returncode} before answering")
        await asyncio.sleep(0.02)
