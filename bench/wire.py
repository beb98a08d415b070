"""Bytes per request at every operating point: codec, serialized request, and socket.

Usage: ``python bench/wire.py --bundle DIR --data SPEC [--requests N]``

For each width of the bundle, and each codec there (the quantise+zstd codec at 4 and 2 bits,
and every rate point), ``--requests`` (200) test inputs are encoded by the head and sent to
an in-process ``tandem cloud serve`` through the link emulator (``sim/emulator.py``, fast
links), which counts what crosses the socket, TCP payload with every HTTP/2 and gRPC frame.
Two ways of sending, each on a fresh connection:

* ``unary``: one ``Infer`` call per input, built as ``tandem edge run`` builds it (request
  id, model, pinned version, width, the codec's bytes);
* ``stream``: one ``InferStream``; a context definition, then per input only its payload
  and a seq (``InferRequest.context``/``seq``), reporting answers read.

Reported per point: mean codec bytes (header included), mean serialized request bytes of
each way, and socket bytes per request up (and down) of each way: the connection's total
over the requests, so its set-up (HTTP/2 preface, settings, headers) is shared among them.

With ``--accuracy``, every point also streams the whole test split through one
``InferStream`` and reports ``served_accuracy`` from the answers, next to the
``eval_accuracy`` that ``tandem eval`` measured for the point (the bundle's table): the two
are equal when the service decodes and runs what the head sent.
Prints exactly one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import tempfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tandem.bundle import HeadRunner, copy_bundle
from tandem.cloud.config import ServeConfig
from tandem.cloud.server import CloudServer
from tandem.data import load_data
from tandem.sim.emulator import LinkEmulator
from tandem.sim.link import Link
from tandem.sim.traces import constant
from tandem.wire.v1 import split_inference_pb2 as pb
from tandem.wire.v1 import split_inference_pb2_grpc as pb_grpc

V1_BITS = (4, 2)
FAST_MBPS = 1000.0
WINDOW = 64  # requests a stream keeps unanswered


def _unary_requests(head: HeadRunner, width: float, payloads: list[bytes]) -> list[Any]:
    m = head.manifest
    return [
        pb.InferRequest(request_id=secrets.token_urlsafe(12), model=m.name, version=m.version,
                        width=width, payload=p)
        for p in payloads
    ]  # fmt: skip


def _stream_messages(head: HeadRunner, width: float, payloads: list[bytes]) -> list[Any]:
    m = head.manifest
    definition = pb.InferRequest(
        request_id=secrets.token_urlsafe(12), model=m.name, version=m.version, width=width,
        context=1,
    )  # fmt: skip
    return [definition, *(pb.InferRequest(context=1, seq=i, payload=p)
                          for i, p in enumerate(payloads))]  # fmt: skip


async def _unary(address: str, requests: list[Any]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.SplitInferenceStub(channel)
        for request in requests:
            await stub.Infer(request, timeout=60)


async def _stream(address: str, messages: list[Any]) -> list[int]:
    """Keeps at most WINDOW requests unanswered, and says how many answers it has read;
    returns the predicted class of each request, in the order sent."""
    predictions = [-1] * (len(messages) - 1)

    def take(result: Any) -> None:
        assert result.HasField("response"), result
        predictions[result.seq] = result.response.top[0].index

    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.SplitInferenceStub(channel).InferStream(timeout=600)
        await call.write(messages[0])
        read = 0
        for i, message in enumerate(messages[1:]):
            while i - read >= WINDOW:
                take(await call.read())
                read += 1
            message.answers_read = read
            await call.write(message)
        await call.done_writing()
        while (result := await call.read()) is not grpc.aio.EOF:
            take(result)
            read += 1
        assert read == len(messages) - 1
    return predictions


async def _socket_bytes(address: str, send: Any, messages: list[Any]) -> dict[str, int]:
    host, port = address.rsplit(":", 1)
    up, down = Link(constant(FAST_MBPS)), Link(constant(FAST_MBPS))
    emulator = LinkEmulator(up, down, (host, int(port)))
    await emulator.start()
    try:
        await send(f"127.0.0.1:{emulator.port}", messages)
        await asyncio.sleep(0.2)  # the last frames (a GOAWAY, pings) are delivered
        return dict(emulator.delivered)
    finally:
        await emulator.close()


async def measure(bundle: Path, data: str, n: int, accuracy: bool) -> list[dict[str, Any]]:
    """One row per (width, codec) point; see the module docstring."""
    head = HeadRunner.from_bundle(bundle)
    test = load_data(data).test
    x = test.x[:n]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        copy_bundle(bundle, repo, head.manifest.name)
        cfg = ServeConfig(models=repo, listen="127.0.0.1:0", metrics_listen=None)
        server = CloudServer(cfg)
        await server.start()
        try:
            for width in head.manifest.bottleneck.widths:
                z = head.features(x, width)
                codecs: dict[str, list[bytes]] = {f"{b}-bit+zstd": head.pack(z, b) for b in V1_BITS}
                for i in range(len(head.points)):
                    codecs[f"entropy p{i}"] = head.pack_entropy(z, width, i)
                for name, payloads in codecs.items():
                    served = (
                        await _served_accuracy(server.address, head, width, name, test)
                        if accuracy
                        else {}
                    )
                    unary = _unary_requests(head, width, payloads)
                    stream = _stream_messages(head, width, payloads)
                    u = await _socket_bytes(server.address, _unary, unary)
                    s = await _socket_bytes(server.address, _stream, stream)
                    rows.append({
                        "width": width, "codec": name,
                        "codec_bytes": _mean(len(p) for p in payloads),
                        "unary_request_bytes": _mean(r.ByteSize() for r in unary),
                        "stream_request_bytes": _mean(r.ByteSize() for r in stream[1:]),
                        "unary_socket_up": round(u["up"] / len(x), 1),
                        "stream_socket_up": round(s["up"] / len(x), 1),
                        "unary_socket_down": round(u["down"] / len(x), 1),
                        "stream_socket_down": round(s["down"] / len(x), 1),
                        **served,
                    })  # fmt: skip
        finally:
            await server.drain()
    return rows


async def _served_accuracy(
    address: str, head: HeadRunner, width: float, name: str, test: Any
) -> dict[str, Any]:
    """The whole test split streamed at one point: accuracy of the answers, beside the
    accuracy ``tandem eval`` stored for the point."""
    z = head.features(test.x, width)
    if name.startswith("entropy p"):
        point = int(name.removeprefix("entropy p"))
        payloads = head.pack_entropy(z, width, point)
        row = [p for p in head.manifest.table if p.codec == "entropy" and p.point == point]
    else:
        bits = int(name.split("-")[0])
        payloads = head.pack(z, bits)
        row = [p for p in head.manifest.table if p.codec == "quantize" and p.bits == bits]
    predictions = await _stream(address, _stream_messages(head, width, payloads))
    evaluated = [p.accuracy for p in row if p.width == width]
    return {
        "served_samples": len(payloads),
        "served_accuracy": float(np.mean(np.asarray(predictions) == test.y)),
        "eval_accuracy": evaluated[0] if evaluated else None,
    }


def _mean(values: Any) -> float:
    return round(float(np.mean(list(values))), 2)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle directory")
    parser.add_argument("--data", required=True, help="digits | npz:PATH | imagefolder:DIR")
    parser.add_argument("--requests", type=int, default=200, help="inputs sent each way")
    parser.add_argument(
        "--accuracy", action="store_true",
        help="also stream the whole test split at every point and compare its accuracy with "
        "the bundle's table",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be >= 1")
    rows = asyncio.run(measure(args.bundle, args.data, args.requests, args.accuracy))
    print(json.dumps({"bench": "wire", "bundle": str(args.bundle), "requests": args.requests,
                      "points": rows}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
