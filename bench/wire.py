"""Bytes per request at every operating point, sent by the real edge daemon: codec, message
and socket, over each of the daemon's transports.

Usage: ``python bench/wire.py --bundle DIR --data SPEC [--requests N] [--accuracy]``

For each width of the bundle, and each codec there (the quantise+zstd codec at 4 and 2 bits,
and every rate point), ``tandem edge run``'s daemon (in process) serves the first
``--requests`` (200) test inputs pinned at that point, to an in-process ``tandem cloud serve``,
through the link emulator (``sim/emulator.py``, fast links), which counts what crosses the
socket: TCP payload with every HTTP/2 and gRPC frame. Once per transport, each run on a fresh
connection and spool:

* ``unary``: one ``Infer`` call per input (request id, model, pinned version, width, the
  codec's bytes);
* ``stream`` (the daemon's default): one ``InferStream``; a context's definition, then per
  input its payload, context, seq and ``answers_read``.

Reported per point: mean codec bytes (header included); per transport, the mean message bytes
the daemon reported sending (``bytes_sent`` of its records) and the socket bytes per request
up and down (the connection's total over the requests, so its set-up, the stream's
definitions and the daemon's one ``GetServerInfo`` are shared among them); and the accuracy of
the daemon's answers on the stream (``served_accuracy``, over ``served_samples``) beside the
accuracy ``tandem eval`` measured for the point (the bundle's table; null for a point the
table lacks). With ``--accuracy`` the stream run serves the whole test split, so the two
accuracies are equal when the service decodes and runs what the head sent.
Prints exactly one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandem.bundle import HeadRunner, Manifest, copy_bundle
from tandem.cloud.config import ServeConfig
from tandem.cloud.server import CloudServer
from tandem.data import load_data
from tandem.edge.config import DaemonConfig
from tandem.edge.daemon import EdgeDaemon
from tandem.sim.emulator import LinkEmulator
from tandem.sim.link import Link
from tandem.sim.traces import constant

V1_BITS = (4, 2)
FAST_MBPS = 1000.0
TRANSPORTS = ("unary", "stream")


@dataclass(frozen=True)
class Point:
    """One operating point: a width and a codec (bits of quantise+zstd, or a rate point)."""

    width: float
    bits: int | None = None
    point: int | None = None

    @property
    def codec(self) -> str:
        """The codec's name in the report."""
        return f"{self.bits}-bit+zstd" if self.point is None else f"entropy p{self.point}"

    def eval_accuracy(self, manifest: Manifest) -> float | None:
        """What ``tandem eval`` measured here, when the bundle's table has the point."""
        for row in manifest.table:
            same = row.point == self.point if self.point is not None else row.bits == self.bits
            codec = "entropy" if self.point is not None else "quantize"
            if row.width == self.width and row.codec == codec and same:
                return row.accuracy
        return None


@dataclass(frozen=True)
class Run:
    """One daemon run: its records and what crossed the emulator's sockets."""

    records: list[dict[str, Any]]
    up: int
    down: int

    def per_request(self, transport: str) -> dict[str, float]:
        n = len(self.records)
        return {
            f"{transport}_request_bytes": _mean(r["bytes_sent"] for r in self.records),
            f"{transport}_socket_up": round(self.up / n, 1),
            f"{transport}_socket_down": round(self.down / n, 1),
        }


async def daemon_run(
    bundle: Path, data: str, address: str, point: Point, transport: str, n: int | None, tmp: Path
) -> Run:
    """``n`` test inputs (None: all) served by the daemon at ``point`` through the emulator."""
    host, port = address.rsplit(":", 1)
    emulator = LinkEmulator(Link(constant(FAST_MBPS)), Link(constant(FAST_MBPS)), (host, int(port)))
    await emulator.start()
    sink = tmp / f"{transport}-{point.width}-{point.codec}.jsonl"
    try:
        cfg = DaemonConfig(
            bundle=bundle, cloud=f"127.0.0.1:{emulator.port}", source=data, sink=str(sink),
            limit=n, width=point.width, bits=point.bits, point=point.point,
            transport=transport, fallback=False, head_batch=64,
        )  # fmt: skip
        summary = await EdgeDaemon(cfg).run()
        await asyncio.sleep(0.2)  # the last frames (a GOAWAY, pings) are delivered
        delivered = dict(emulator.delivered)
    finally:
        await emulator.close()
    records = [json.loads(line) for line in sink.read_text().splitlines()]
    if summary["errors"] or len(records) != summary["served"]:
        raise RuntimeError(f"the daemon failed {summary['errors']} inputs at {point}")
    return Run(records, delivered["up"], delivered["down"])


def points(head: HeadRunner) -> list[Point]:
    """Every width with 4 and 2 bits of quantise+zstd and every rate point."""
    out = []
    for width in head.manifest.bottleneck.widths:
        out += [Point(width, bits=b) for b in V1_BITS]
        out += [Point(width, point=i) for i in range(len(head.points))]
    return out


async def measure(
    bundle: Path, data: str, n: int, accuracy: bool, widths: list[float] | None = None
) -> list[dict[str, Any]]:
    """One row per (width, codec) point, of ``widths`` (default: all); see the module
    docstring."""
    head = HeadRunner.from_bundle(bundle)
    chosen = [p for p in points(head) if widths is None or p.width in widths]
    if not chosen:
        raise SystemExit(f"none of widths {widths} is in the bundle")
    test = load_data(data).test
    x = test.take(range(min(n, len(test))))
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        tmp = Path(workdir)
        copy_bundle(bundle, tmp / "repo", head.manifest.name)
        server = CloudServer(ServeConfig(models=tmp / "repo", listen="127.0.0.1:0",
                                         metrics_listen=None))  # fmt: skip
        await server.start()
        try:
            for p in chosen:
                z = head.features(x, p.width)
                payloads = head.pack(z, p.bits) if p.point is None else head.pack_entropy(
                    z, p.width, p.point
                )  # fmt: skip
                row: dict[str, Any] = {"width": p.width, "codec": p.codec,
                                       "codec_bytes": _mean(len(b) for b in payloads)}  # fmt: skip
                for transport in TRANSPORTS:
                    limit = None if accuracy and transport == "stream" else n
                    run = await daemon_run(bundle, data, server.address, p, transport, limit, tmp)
                    row |= run.per_request(transport)
                row |= {
                    "served_samples": len(run.records),
                    "served_accuracy": float(
                        np.mean([r["prediction"] == r["label"] for r in run.records])
                    ),
                    "eval_accuracy": p.eval_accuracy(head.manifest),
                }
                rows.append(row)
        finally:
            await server.drain()
    return rows


def _mean(values: Any) -> float:
    return round(float(np.mean(list(values))), 2)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle directory")
    parser.add_argument("--data", required=True, help="digits | npz:PATH | imagefolder:DIR")
    parser.add_argument(
        "--widths", type=float, nargs="+",
        help="measure only these of the bundle's widths (default: every one)",
    )  # fmt: skip
    parser.add_argument("--requests", type=int, default=200, help="inputs sent each way")
    parser.add_argument(
        "--accuracy", action="store_true",
        help="serve the whole test split on the stream at every point, so that its accuracy "
        "can be compared with the bundle's table",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be >= 1")
    logging.getLogger("tandem").setLevel(logging.WARNING)
    rows = asyncio.run(measure(args.bundle, args.data, args.requests, args.accuracy, args.widths))
    print(json.dumps({"bench": "wire", "bundle": str(args.bundle), "requests": args.requests,
                      "points": rows}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
