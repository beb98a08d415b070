"""The repository seen through the service: slow scans and versions not held (issue 12)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest
from serving import config, connected, make_repo

from tandem.wire.v1 import split_inference_pb2 as pb

HUNG_SCAN_S = 120.0  # how long the stuck scan waits at most, if nothing releases it
MISS_WAIT_S = 0.5  # how long an unknown name waits for the stuck scan
PROMPT_S = 10.0  # NOT_FOUND must come well before the request's own deadline
DEADLINE_S = 60.0


@pytest.fixture
def repo(tmp_path: Path, digits_bundle: Path) -> Path:
    return make_repo(tmp_path, digits_bundle)


def _request(model: str, version: str = "") -> pb.InferRequest:
    return pb.InferRequest(request_id="r1", model=model, version=version, width=0.5)


async def _status(call: asyncio.Future) -> tuple[grpc.StatusCode, str]:  # type: ignore[type-arg]
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_an_unknown_model_is_not_found_promptly_while_a_scan_hangs(repo: Path) -> None:
    entered, release = threading.Event(), threading.Event()

    async def main() -> tuple[grpc.StatusCode, float]:
        settings = config(repo, poll_s=3600, miss_rescan_s=0, miss_wait_s=MISS_WAIT_S)
        async with connected(settings) as (server, stub):
            real_scan = server.repo.scan

            def hung_scan() -> int:  # a scan stuck on I/O (a slow disk, a file that blocks)
                entered.set()
                release.wait(HUNG_SCAN_S)
                return real_scan()

            server.repo.scan = hung_scan  # type: ignore[method-assign]
            poll = asyncio.create_task(server.rescan(force=True))
            try:
                while not entered.is_set():
                    await asyncio.sleep(0.01)
                start = time.monotonic()
                code, _ = await _status(stub.Infer(_request("nope"), timeout=DEADLINE_S))
                return code, time.monotonic() - start
            finally:
                release.set()
                await poll

    code, took = asyncio.run(main())
    assert code == grpc.StatusCode.NOT_FOUND
    assert took < PROMPT_S


def test_a_version_not_held_is_not_found_and_names_the_versions_held(repo: Path) -> None:
    async def main() -> tuple[tuple[grpc.StatusCode, str], list[str]]:
        async with connected(config(repo)) as (_server, stub):
            models = await stub.ListModels(pb.ListModelsRequest(), timeout=30)
            answer = await _status(stub.Infer(_request("digits", "0123abc"), timeout=30))
            return answer, [m.version for m in models.models]

    (code, details), held = asyncio.run(main())
    assert code == grpc.StatusCode.NOT_FOUND
    assert held and all(v in details for v in held), details
