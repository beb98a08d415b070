"""The process compute backend: same answers as threads, and it survives a dead worker."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from serving import config, make_repo, requests_for, running, server_process

from tandem.adapters import save_adapter
from tandem.bundle import TailRunner
from tandem.data import load_data
from tandem.edge.client import CloudClient
from tandem.wire.v1 import split_inference_pb2 as pb

WIDTH, BITS = 0.5, 4


def _adapter(bundle: Path) -> None:
    fc = TailRunner.from_bundle(bundle).model.tail.fc
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, fc.in_features, generator=g)
    b = torch.randn(fc.out_features, 4, generator=g)
    path = bundle / "adapters" / "shift" / "1"
    save_adapter(path, lora={"tail.fc": (a, b)}, rank=4, alpha=8.0, target_modules=["tail.fc"])


def _answers(repo: Path, requests: list[pb.InferRequest], **cfg: object) -> list[list[float]]:
    async def main() -> list[list[float]]:
        async with running(config(repo, **cfg)) as server, CloudClient(server.address) as c:
            return [list((await c.infer(r)).response.logits) for r in requests]

    return asyncio.run(main())


def test_processes_answer_like_threads(tmp_path: Path, digits_bundle: Path) -> None:
    repo = make_repo(tmp_path, digits_bundle)
    _adapter(repo / "digits")
    requests = requests_for(digits_bundle, load_data("digits").test.x[:16], WIDTH, BITS)
    for i, r in enumerate(requests):
        r.return_logits = True
        r.adapter = "shift" if i % 2 else ""
    threads = _answers(repo, requests)
    processes = _answers(repo, requests, compute="processes")
    np.testing.assert_allclose(processes, threads, rtol=1e-5, atol=1e-5)


def test_a_killed_worker_process_is_replaced(tmp_path: Path, digits_bundle: Path) -> None:
    repo = make_repo(tmp_path, digits_bundle)
    first, second = requests_for(digits_bundle, load_data("digits").test.x[:2], WIDTH, BITS)
    codes: list[grpc.StatusCode] = []

    async def main() -> tuple[pb.InferResponse, pb.InferResponse]:
        async with (
            running(config(repo, compute="processes")) as server,
            CloudClient(server.address, seed=0, on_retry=codes.append) as client,
        ):
            before = (await client.infer(first)).response
            for pid in list(server.compute._pool._processes):  # type: ignore[attr-defined]
                os.kill(pid, signal.SIGKILL)
            return before, (await client.infer(second)).response

    before, after = asyncio.run(main())
    assert before.top and after.top
    assert codes == [grpc.StatusCode.UNAVAILABLE], "one failed attempt, then a fresh worker"


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_worker_processes_exit_when_the_server_is_killed(
    tmp_path: Path, digits_bundle: Path
) -> None:
    repo = make_repo(tmp_path, digits_bundle)
    (request,) = requests_for(digits_bundle, load_data("digits").test.x[:1], WIDTH, BITS)

    async def ask(address: str) -> None:
        async with CloudClient(address) as client:
            assert (await client.infer(request)).response.top

    args = ["--models", str(repo), "--listen", "127.0.0.1:0", "--metrics-listen", "off"]
    with server_process(*args, "--compute", "processes") as (proc, ready):
        asyncio.run(ask(ready["address"]))  # the pool starts its worker on the first batch
        workers = _children(proc.pid)
        assert workers, "the server has a worker process"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), "a worker outlived its server"
