"""Bounded load: 64 concurrent edge clients, a fixed number of requests, no errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

from serving import config, make_repo, requests_for, running

from tandem.data import load_data
from tandem.edge.client import CloudClient
from tandem.wire.v1 import split_inference_pb2 as pb

CLIENTS = 64
PER_CLIENT = 20


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def test_64_clients_no_errors_and_batches_form(tmp_path: Path, digits_bundle: Path) -> None:
    x = load_data("digits").test.x[: CLIENTS * PER_CLIENT // 4]
    base = requests_for(digits_bundle, x, 0.5, 4)
    retries: list[object] = []

    async def client(i: int, address: str) -> list[pb.InferResponse]:
        async with CloudClient(address, seed=i, on_retry=retries.append) as c:
            out = []
            for j in range(PER_CLIENT):
                request = pb.InferRequest()
                request.CopyFrom(base[(i * PER_CLIENT + j) % len(base)])
                request.request_id = f"c{i}-{j}"
                out.append((await c.infer(request)).response)
            return out

    async def main() -> tuple[list[list[pb.InferResponse]], str]:
        async with running(config(make_repo(tmp_path, digits_bundle), max_delay_ms=5)) as server:
            answers = await asyncio.gather(*(client(i, server.address) for i in range(CLIENTS)))
            return answers, server.metrics.text()

    answers, metrics = asyncio.run(main())
    responses = [r for per_client in answers for r in per_client]
    assert len(responses) == CLIENTS * PER_CLIENT
    assert len({r.request_id for r in responses}) == len(responses)
    assert "tandem_errors_total{" not in metrics, "no call failed"
    assert retries == [], "no call needed a retry"
    batches = _metric(metrics, "tandem_batch_size_count")
    assert _metric(metrics, "tandem_batch_size_sum") == len(responses)
    assert batches < len(responses) / 4, "requests from many clients share forward passes"
    assert max(r.batch_size for r in responses) > 8
