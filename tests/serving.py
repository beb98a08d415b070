"""Helpers for serving tests: in-process servers, real server processes, bundle repositories."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tandem.bundle import HeadRunner, copy_bundle
from tandem.cloud.config import ServeConfig
from tandem.cloud.server import CloudServer
from tandem.protocol import to_message
from tandem.wire.v1 import split_inference_pb2 as pb
from tandem.wire.v1 import split_inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
TANDEM = [sys.executable, "-m", "tandem.cli"]


def make_repo(tmp: Path, bundle: Path, name: str = "digits") -> Path:
    """A model repository holding a copy of ``bundle`` under ``name``."""
    repo = tmp / "repo"
    copy_bundle(bundle, repo, name)
    return repo


def config(repo: Path, **overrides: Any) -> ServeConfig:
    """Settings for a test server: loopback, port 0, metrics on a free port too."""
    fields: dict[str, Any] = {
        "models": repo,
        "listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        "drain_grace_s": 5.0,
        **overrides,
    }
    return ServeConfig.model_validate(fields)


@asynccontextmanager
async def running(cfg: ServeConfig) -> AsyncIterator[CloudServer]:
    """A started server, always drained on the way out."""
    server = CloudServer(cfg)
    try:
        await server.start()
        yield server
    finally:
        await server.drain()


@asynccontextmanager
async def connected(
    cfg: ServeConfig,
) -> AsyncIterator[tuple[CloudServer, pb_grpc.SplitInferenceStub]]:
    """A started server and a stub on a plain-text channel to it."""
    async with running(cfg) as server, grpc.aio.insecure_channel(server.address) as channel:
        yield server, pb_grpc.SplitInferenceStub(channel)


def requests_for(
    bundle: Path, x: np.ndarray, width: float, bits: int, model: str = "digits", prefix: str = "r"
) -> list[pb.InferRequest]:
    """One request per input, encoded by the bundle's head."""
    payloads = HeadRunner.from_bundle(bundle).encode(x, width, bits)
    return [
        pb.InferRequest(request_id=f"{prefix}{i}", model=model, width=width, features=to_message(p))
        for i, p in enumerate(payloads)
    ]


@contextmanager
def server_process(
    *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """``tandem cloud serve --json ARGS`` as a real process; yields it and its ready line."""
    proc = subprocess.Popen(
        [*TANDEM, "cloud", "serve", "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")
        yield proc, json.loads(line)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def edge_command(*args: str) -> list[str]:
    """The ``tandem edge run --json ARGS`` command line."""
    return [*TANDEM, "edge", "run", "--json", *args]


def sink_lines(path: Path) -> int:
    """Complete lines in a JSON-lines sink written so far."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


async def ended_stream(
    cfg: ServeConfig, messages: list[pb.InferRequest], timeout: float = 60
) -> tuple[list[pb.StreamResult], grpc.aio.AioRpcError]:
    """Send ``messages`` on one InferStream of a server run with ``cfg``; the answers it got
    and the error that ended it (the stream must end with one)."""
    async with running(cfg) as server, grpc.aio.insecure_channel(server.address) as channel:
        call = pb_grpc.SplitInferenceStub(channel).InferStream(iter(messages), timeout=timeout)
        results: list[pb.StreamResult] = []
        try:
            async for result in call:
                results.append(result)
        except grpc.aio.AioRpcError as exc:
            return results, exc
    raise AssertionError("the stream ended without an error")
