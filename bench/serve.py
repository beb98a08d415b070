"""Benchmark the cloud service and the edge daemon against their raw compute, side by side.

Usage: ``python bench/serve.py [--bundle DIR --data SPEC]... [--runs N] [--requests N]``

In one run, on each bundle given (each with its ``--data``, one after the other; a quick
MNIST bundle is trained when none is given), it measures:

* ``raw``: decoder + tail in-process on one thread (decode included), at batch sizes
  1..128; the best batch size's samples/s is the reference;
* ``service``: ``tandem cloud serve`` as its own process (one worker, one torch thread: the
  same compute as ``raw``), with each compute backend (a worker thread, a worker process),
  loaded by 32 concurrent clients from this process: over unary ``Infer`` with one request
  outstanding each, over one ``InferStream`` per client with one outstanding (``stream``), and
  with four outstanding, as the edge daemon pipelines (``pipelined``); requests/s, p50/p99;
* ``grpc_floor``: the same load against a server whose handler does nothing, which is the
  most any Python gRPC service reaches on this machine with this load generator;
* ``edge``: ``tandem edge run`` over the data's test split against the service, inputs/s,
  next to the head + encoder alone at the daemon's batch size.

Ratios: service / raw (the issue's target is 0.8), service / grpc_floor (what Tandem costs
above gRPC itself), and edge / head. Each figure is the median of ``--runs`` runs.
Prints exactly one JSON line on stdout: ``{"bench": "serve", "cases": [one per bundle]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from tandem.bundle import HeadRunner, TailRunner, copy_bundle, read_manifest
from tandem.data import load_data
from tandem.protocol import to_message
from tandem.wire.v1 import split_inference_pb2 as pb
from tandem.wire.v1 import split_inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"
BATCHES = (1, 8, 16, 32, 64, 128)
CLIENTS = 32
DEPTH = 4  # requests each pipelined client keeps outstanding
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def quick_bundle(data: str, out: Path) -> Path:
    """Train a small MNIST bundle (one epoch per phase): compute cost is what matters here."""
    from tandem.build import build_bundle
    from tandem.config import load_recipe

    sets = ["teacher.train.epochs=1", "distill.head.epochs=1", "distill.finetune.epochs=1"]
    build_bundle(load_recipe("mnist", [*sets, "eval_bits=[4]"]), load_data(data), out)
    return out


def raw_throughput(tail: TailRunner, payloads: list[bytes], seconds: float) -> dict[int, float]:
    """Samples/s of decode + decoder + tail on this thread, per batch size."""
    out = {}
    for bs in BATCHES:
        batches = [payloads[i : i + bs] for i in range(0, len(payloads) - bs + 1, bs)]
        tail.infer(batches[0])
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for batch in batches:
                tail.infer(batch)
                done += len(batch)
        out[bs] = done / (time.perf_counter() - start)
    return out


def head_throughput(head: HeadRunner, x: np.ndarray, width: float, bits: int, bs: int) -> float:
    """Inputs/s of head + encoder + codec on this thread, at the daemon's batch size."""
    head.encode(x[:bs], width, bits)
    start = time.perf_counter()
    for i in range(0, len(x), bs):
        head.encode(x[i : i + bs], width, bits)
    return len(x) / (time.perf_counter() - start)


@contextmanager
def process(cmd: list[str]) -> Iterator[dict[str, Any]]:
    """A server process that prints one JSON ready line; terminated on exit."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{cmd} did not start")
        yield json.loads(line)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _summary(latencies: list[float], seconds: float) -> dict[str, float]:
    lat = np.asarray(latencies) * 1000
    return {
        "rps": len(latencies) / seconds,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


async def unary_load(address: str, requests: list[pb.InferRequest]) -> dict[str, float]:
    """32 clients, each its own channel and one request outstanding, until all are sent."""
    pending = iter(requests)
    latencies: list[float] = []

    async def client() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.SplitInferenceStub(channel)
            for request in pending:
                sent = time.perf_counter()
                await stub.Infer(request, timeout=60)
                latencies.append(time.perf_counter() - sent)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return _summary(latencies, time.perf_counter() - start)


async def stream_load(
    address: str, requests: list[pb.InferRequest], depth: int = 1
) -> dict[str, float]:
    """32 clients, each one InferStream with ``depth`` requests outstanding."""
    pending = iter(requests)
    latencies: list[float] = []

    async def client() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.SplitInferenceStub(channel).InferStream(timeout=600)
            slots, sent = asyncio.Semaphore(depth), dict[str, float]()
            read = 0  # answers read, reported in each request (the server's stream window)

            async def reader_loop() -> None:
                nonlocal read
                async for result in call:
                    if not result.HasField("response"):
                        raise RuntimeError(f"stream request failed: {result.error}")
                    latencies.append(time.perf_counter() - sent.pop(result.request_id))
                    read += 1
                    slots.release()

            reader = asyncio.create_task(reader_loop())
            for request in pending:
                await slots.acquire()
                sent[request.request_id] = time.perf_counter()
                request.answers_read = read
                await call.write(request)
            await call.done_writing()
            await reader

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return _summary(latencies, time.perf_counter() - start)


async def pipelined_load(address: str, requests: list[pb.InferRequest]) -> dict[str, float]:
    """32 clients, each one InferStream with :data:`DEPTH` requests outstanding, as the edge
    daemon keeps several in flight."""
    return await stream_load(address, requests, DEPTH)


def _requests(payloads: list[bytes], model: str, width: float, n: int, tag: str) -> list:
    return [
        pb.InferRequest(
            request_id=f"{tag}-{i}", model=model, width=width,
            features=to_message(payloads[i % len(payloads)]),
        )
        for i in range(n)
    ]  # fmt: skip


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _loads(
    address: str, payloads: list[bytes], model: str, width: float, n: int, runs: int, tag: str
) -> dict[str, dict[str, float]]:
    """Medians of ``runs`` unary and ``runs`` streaming loads of ``n`` requests each."""
    figures = {}
    for mode, load in MODES.items():
        figures[mode] = _median([
            asyncio.run(load(address, _requests(payloads, model, width, n, f"{tag}{mode}{r}")))
            for r in range(runs)
        ])  # fmt: skip
    return figures


MODES = {"unary": unary_load, "stream": stream_load, "pipelined": pipelined_load}


def serve_echo(port: int) -> None:
    """A server whose Infer does nothing: the gRPC floor for the same load."""

    class Echo(pb_grpc.SplitInferenceServicer):
        async def Infer(self, request: Any, context: Any) -> pb.InferResponse:
            return pb.InferResponse(request_id=request.request_id)

        async def InferStream(self, requests: Any, context: Any) -> Any:
            async for request in requests:
                response = pb.InferResponse(request_id=request.request_id)
                yield pb.StreamResult(request_id=request.request_id, response=response)

    async def run() -> None:
        server = grpc.aio.server()
        pb_grpc.add_SplitInferenceServicer_to_server(Echo(), server)
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print(json.dumps({"port": bound}), flush=True)
        await server.wait_for_termination()

    asyncio.run(run())


def edge_run(
    bundle: Path, data: str, address: str, width: float, bits: int, n: int, sink: Path
) -> float:
    """Inputs/s of ``tandem edge run`` over ``n`` inputs of the data's test split."""
    for path in (sink, Path(f"{sink}.spool")):
        path.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "tandem.cli", "edge", "run", "--json", "--bundle", str(bundle),
        "--cloud", address, "--source", data, "--sink", str(sink), "--limit", str(n),
        "--width", str(width), "--bits", str(bits), "--no-fallback",
        "--concurrency", str(CLIENTS), "--head-batch", str(CLIENTS),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, check=False)
    if out.returncode != 0:  # 1: some inputs failed; the daemon's log says which and why
        raise RuntimeError(f"edge run exited {out.returncode}: {out.stderr[-3000:]}")
    summary = json.loads(out.stdout)
    if summary["served"] != n or summary["errors"]:
        raise RuntimeError(f"edge run failed: {summary}")
    return float(summary["inputs_per_s"])


def _serve_command(repo: Path, compute: str) -> list[str]:
    return [
        sys.executable, "-m", "tandem.cli", "cloud", "serve", "--json", "--models", str(repo),
        "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--workers", "1",
        "--compute", compute, "--torch-threads", "1", "--max-batch", "64",
        "--max-delay-ms", "2",
    ]  # fmt: skip


def measure(bundle: Path, data: str, runs: int, n: int, tmp: Path) -> dict[str, Any]:
    """Every figure of the benchmark; see the module docstring."""
    torch.set_num_threads(1)
    tmp.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(bundle)
    width, bits = min(manifest.bottleneck.widths), manifest.codec.bits
    x = load_data(data).test.x[:n]
    head, tail = HeadRunner.from_bundle(bundle), TailRunner.from_bundle(bundle)
    payloads = head.encode(x, width, bits)
    raw_runs = [raw_throughput(tail, payloads[:1024], 0.5) for _ in range(runs)]
    raw = {bs: statistics.median(r[bs] for r in raw_runs) for bs in BATCHES}
    best_bs = max(raw, key=lambda bs: raw[bs])

    repo = tmp / "repo"
    if not (repo / manifest.name).exists():
        copy_bundle(bundle, repo, manifest.name)
    service, edge = {}, 0.0
    for compute in ("threads", "processes"):
        with process(_serve_command(repo, compute)) as ready:
            address = ready["address"]
            # Unmeasured warm-up: a worker process loads the model on its first batch.
            asyncio.run(unary_load(address, _requests(payloads, manifest.name, width, 256, "w")))
            service[compute] = _loads(address, payloads, manifest.name, width, n, runs, "m")
            if compute == "threads":
                edge = statistics.median(
                    edge_run(bundle, data, address, width, bits, n, tmp / "edge.jsonl")
                    for _ in range(runs)
                )
    with process([sys.executable, __file__, "--echo", "0"]) as ready:
        floor = _loads(f"127.0.0.1:{ready['port']}", payloads, "m", width, n, runs, "e")
    head_rate = statistics.median(
        head_throughput(head, x, width, bits, CLIENTS) for _ in range(runs)
    )
    return {
        "bundle": manifest.name, "width": width, "bits": bits, "requests": n, "runs": runs,
        "clients": CLIENTS, "cpu_count": os.cpu_count(),
        "raw_samples_per_s": {str(k): round(v, 1) for k, v in raw.items()},
        "raw_best": {"batch": best_bs, "samples_per_s": round(raw[best_bs], 1)},
        "service": service,
        "grpc_floor": floor,
        "ratios": {
            **{
                f"service_{compute}_{mode}_vs_raw": service[compute][mode]["rps"] / raw[best_bs]
                for compute in service
                for mode in MODES
            },
            **{
                f"service_{compute}_{mode}_vs_grpc_floor": service[compute][mode]["rps"]
                / floor[mode]["rps"]
                for compute in service
                for mode in MODES
            },
            "edge_vs_head": edge / head_rate,
        },
        "edge": {"inputs_per_s": edge, "head_inputs_per_s": head_rate},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on each bundle in turn and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bundle", type=Path, action="append", default=[],
        help="a bundle to serve (repeatable, each with its --data; default: train a quick "
        "MNIST bundle)",
    )  # fmt: skip
    parser.add_argument(
        "--data", action="append", default=[],
        help=f"the test inputs of each --bundle, in the same order (default: npz:{MNIST})",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--echo", type=int, help=argparse.SUPPRESS)  # internal: floor server
    args = parser.parse_args(argv)
    if args.echo is not None:
        serve_echo(args.echo)
        return 0
    data = args.data or [f"npz:{MNIST}"] * max(len(args.bundle), 1)
    if len(data) != max(len(args.bundle), 1):
        parser.error(f"give one --data per --bundle ({len(args.bundle)} bundles, {len(data)} data)")
    cases = []
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp:
        bundles = args.bundle or [quick_bundle(data[0], Path(tmp) / "bundle")]
        for i, (bundle, spec) in enumerate(zip(bundles, data, strict=True)):
            cases.append(measure(bundle, spec, args.runs, args.requests, Path(tmp) / str(i)))
    print(json.dumps({"bench": "serve", "cases": cases}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
