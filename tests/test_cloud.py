"""The cloud service in-process over real gRPC on loopback: answers, batching, errors."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serving import config, connected, make_repo, requests_for, running

from tandem.bundle import HeadRunner, TailRunner
from tandem.cloud.server import CloudServer
from tandem.data import load_data
from tandem.protocol import from_message
from tandem.wire.v1 import split_inference_pb2 as pb
from tandem.wire.v1 import split_inference_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def test_x() -> tuple[np.ndarray, np.ndarray]:
    test = load_data("digits").test
    return test.x[:48], test.y[:48]


@pytest.fixture()
def repo(tmp_path: Path, digits_bundle: Path) -> Path:
    return make_repo(tmp_path, digits_bundle)


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_answers_equal_in_process_tail_and_requests_are_batched(
    repo: Path, digits_bundle: Path, test_x: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = test_x
    requests = requests_for(digits_bundle, x, 0.5, 4)
    expected = TailRunner.from_bundle(digits_bundle)

    async def main() -> list[pb.InferResponse]:
        async with connected(config(repo, max_delay_ms=50)) as (_server, stub):
            return list(await asyncio.gather(*(stub.Infer(r, timeout=30) for r in requests)))

    responses = asyncio.run(main())
    payloads = HeadRunner.from_bundle(digits_bundle).encode(x, 0.5, 4)
    want = expected.infer(payloads).argmax(1)
    assert [r.top[0].index for r in responses] == want.tolist()
    assert [r.request_id for r in responses] == [r.request_id for r in requests]
    assert max(r.batch_size for r in responses) > 1
    assert all(r.model == "digits" and r.served_by for r in responses)
    assert all(0 < r.top[0].score <= 1 for r in responses)


def test_top_k_and_logits(repo: Path, digits_bundle: Path, test_x: tuple) -> None:
    request = requests_for(digits_bundle, test_x[0][:1], 1.0, 8)[0]
    request.top_k, request.return_logits = 3, True

    async def main() -> pb.InferResponse:
        async with connected(config(repo)) as (_server, stub):
            return await stub.Infer(request, timeout=30)

    response = asyncio.run(main())
    assert len(response.top) == 3 and len(response.logits) == 10
    scores = [c.score for c in response.top]
    assert scores == sorted(scores, reverse=True)
    assert response.top[0].index == int(np.argmax(response.logits))
    assert response.top[0].label == str(response.top[0].index)


def test_retried_request_is_answered_from_the_cache(
    repo: Path, digits_bundle: Path, test_x: tuple
) -> None:
    first, other = requests_for(digits_bundle, test_x[0][:2], 0.25, 4)
    reused = pb.InferRequest()
    reused.CopyFrom(other)
    reused.request_id = first.request_id

    async def main() -> tuple[pb.InferResponse, pb.InferResponse, grpc.StatusCode]:
        async with connected(config(repo)) as (_server, stub):
            a = await stub.Infer(first, timeout=30)
            b = await stub.Infer(first, timeout=30)
            return a, b, await _code(stub.Infer(reused, timeout=30))

    a, b, reused_code = asyncio.run(main())
    assert not a.cached and b.cached
    assert a.top == b.top and a.timings == b.timings
    assert reused_code == grpc.StatusCode.INVALID_ARGUMENT


def test_error_model(repo: Path, digits_bundle: Path, test_x: tuple) -> None:
    good = requests_for(digits_bundle, test_x[0][:1], 0.5, 4)[0]

    def variant(**changes: object) -> pb.InferRequest:
        r = pb.InferRequest()
        r.CopyFrom(good)
        for k, v in changes.items():
            if k == "features":
                r.features.CopyFrom(v)
            else:
                setattr(r, k, v)
        return r

    wrong_width = requests_for(digits_bundle, test_x[0][:1], 1.0, 4)[0].features
    cases = {
        "unknown model": (variant(model="nope"), grpc.StatusCode.NOT_FOUND),
        "unknown version": (variant(version="nope"), grpc.StatusCode.NOT_FOUND),
        "unknown adapter": (variant(adapter="nope"), grpc.StatusCode.NOT_FOUND),
        "untrained width": (variant(width=0.3), grpc.StatusCode.INVALID_ARGUMENT),
        "shape for another width": (
            variant(features=wrong_width),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "no request id": (variant(request_id=""), grpc.StatusCode.INVALID_ARGUMENT),
        "no features": (
            pb.InferRequest(request_id="x", model="digits", width=0.5),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    }

    async def main() -> dict[str, grpc.StatusCode]:
        async with connected(config(repo)) as (_server, stub):
            codes = {k: await _code(stub.Infer(r, timeout=30)) for k, (r, _) in cases.items()}
            codes["valid afterwards"] = await _code(stub.Infer(good, timeout=30))
            return codes

    codes = asyncio.run(main())
    assert codes == {
        **{k: c for k, (_, c) in cases.items()},
        "valid afterwards": grpc.StatusCode.OK,
    }


def test_deadline_passing_in_the_queue(repo: Path, digits_bundle: Path, test_x: tuple) -> None:
    request = requests_for(digits_bundle, test_x[0][:1], 0.5, 4)[0]
    request.deadline_ms = 20  # far shorter than the batch's 1 s window

    async def main() -> grpc.StatusCode:
        async with connected(config(repo, max_delay_ms=1000, max_batch=64)) as (_server, stub):
            return await _code(stub.Infer(request, timeout=30))

    assert asyncio.run(main()) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_full_queue_answers_resource_exhausted(
    repo: Path, digits_bundle: Path, test_x: tuple
) -> None:
    requests = requests_for(digits_bundle, test_x[0][:4], 0.5, 4)

    async def main() -> list[grpc.StatusCode]:
        # One slot, and a batch window long enough for the other three to arrive meanwhile.
        async with connected(config(repo, max_queue=1, max_delay_ms=1500, max_batch=64)) as (
            server,
            stub,
        ):
            first = asyncio.ensure_future(_code(stub.Infer(requests[0], timeout=30)))
            while server.batcher.queued == 0:
                await asyncio.sleep(0.01)
            rest = [await _code(stub.Infer(r, timeout=30)) for r in requests[1:]]
            return [await first, *rest]

    assert asyncio.run(main()) == [grpc.StatusCode.OK] + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3


def test_stream_answers_each_request_and_fails_bad_ones_alone(
    repo: Path, digits_bundle: Path, test_x: tuple
) -> None:
    requests = requests_for(digits_bundle, test_x[0][:20], 0.75, 2)
    requests[5].model = "nope"
    requests[9].width = 0.3

    async def main() -> list[pb.StreamResult]:
        async with connected(config(repo)) as (_server, stub):
            call = stub.InferStream(iter(requests), timeout=30)
            return [r async for r in call]

    results = {r.request_id: r for r in asyncio.run(main())}
    assert set(results) == {r.request_id for r in requests}
    assert results["r5"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert results["r9"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    ok = [r for r in results.values() if r.HasField("response")]
    assert len(ok) == 18


def test_bundle_dropped_in_later_is_served_without_restart(
    repo: Path, digits_bundle: Path, test_x: tuple
) -> None:
    request = requests_for(digits_bundle, test_x[0][:1], 0.5, 4, model="digits")[0]
    request.model = "digits-copy"

    async def main() -> tuple[grpc.StatusCode, grpc.StatusCode, list[str]]:
        async with connected(config(repo, poll_s=3600, miss_rescan_s=0)) as (_server, stub):
            before = await _code(stub.Infer(request, timeout=30))
            shutil.copytree(digits_bundle, repo / "digits-copy" / "v2")
            manifest = repo / "digits-copy" / "v2" / "manifest.json"
            manifest.write_text(
                manifest.read_text().replace('"name": "digits"', '"name": "digits-copy"')
            )
            request.request_id = "again"
            after = await _code(stub.Infer(request, timeout=30))
            models = await stub.ListModels(pb.ListModelsRequest(), timeout=30)
            return before, after, sorted(m.name for m in models.models)

    before, after, names = asyncio.run(main())
    assert before == grpc.StatusCode.NOT_FOUND
    assert after == grpc.StatusCode.OK
    assert names == ["digits", "digits-copy"]


def test_listing_info_health_and_reflection(repo: Path) -> None:
    async def main() -> tuple:
        async with (
            running(config(repo)) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            stub = pb_grpc.SplitInferenceStub(channel)
            models = await stub.ListModels(pb.ListModelsRequest(), timeout=30)
            info = await stub.GetServerInfo(pb.ServerInfoRequest(), timeout=30)
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="tandem.v1.SplitInference"), timeout=30
            )
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = [
                a
                async for a in reflect.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30
                )
            ]
            return models, info, health, answers

    models, info, health, answers = asyncio.run(main())
    (model,) = models.models
    assert model.name == "digits" and list(model.widths) == [0.25, 0.5, 0.75, 1.0]
    assert len(model.table) > 0 and list(model.input_shape) == [1, 8, 8]
    assert info.max_batch == 32 and info.codec_version == 1 and info.tenant == ""
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    services = {s.name for s in answers[0].list_services_response.service}
    assert {"tandem.v1.SplitInference", "grpc.health.v1.Health"} <= services


def test_metrics_count_requests_errors_and_batches(
    repo: Path, digits_bundle: Path, test_x: tuple
) -> None:
    requests = requests_for(digits_bundle, test_x[0][:8], 0.5, 4)
    requests[0].model = "nope"

    async def main() -> str:
        async with connected(config(repo, max_delay_ms=20)) as (server, stub):
            await asyncio.gather(*(_code(stub.Infer(r, timeout=30)) for r in requests))
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            return await asyncio.to_thread(
                lambda: urllib.request.urlopen(url, timeout=10).read().decode()
            )

    text = asyncio.run(main())
    lines = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert float(lines['tandem_errors_total{code="NOT_FOUND",method="Infer",model=""}']) == 1
    assert float(lines['tandem_requests_total{code="OK",method="Infer",model="digits"}']) == 7
    assert float(lines["tandem_batch_size_count"]) >= 1
    assert float(lines["tandem_batch_size_sum"]) == 7
    assert float(lines['tandem_request_seconds_count{stage="compute"}']) == 7
    assert float(lines["tandem_received_bytes_total"]) > 0


def test_drain_finishes_in_flight_requests_and_refuses_new_ones(
    repo: Path, digits_bundle: Path, test_x: tuple
) -> None:
    first, second = requests_for(digits_bundle, test_x[0][:2], 0.5, 4)

    async def main() -> tuple[grpc.StatusCode, grpc.StatusCode]:
        server_cm = running(config(repo, max_delay_ms=500, max_batch=64))
        server = await server_cm.__aenter__()
        channel = grpc.aio.insecure_channel(server.address)
        stub = pb_grpc.SplitInferenceStub(channel)
        try:
            in_flight = asyncio.ensure_future(_code(stub.Infer(first, timeout=30)))
            while server.batcher.queued == 0:
                await asyncio.sleep(0.01)
            drain = asyncio.ensure_future(server.drain())
            while not server.service.draining:
                await asyncio.sleep(0.01)
            refused = await _code(stub.Infer(second, timeout=30))
            await drain
            return await in_flight, refused
        finally:
            await channel.close()
            await server_cm.__aexit__(None, None, None)

    in_flight, refused = asyncio.run(main())
    assert in_flight == grpc.StatusCode.OK
    assert refused == grpc.StatusCode.UNAVAILABLE


def _copy_as(src: Path, dest: Path, **fields: object) -> None:
    """A copy of a bundle whose manifest says something else for ``fields``."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("checkpoint", "adapters"))
    manifest = json.loads((dest / "manifest.json").read_text())
    (dest / "manifest.json").write_text(json.dumps({**manifest, **fields}))


def test_a_bundle_that_cannot_load_does_not_stop_the_others(
    repo: Path, digits_bundle: Path, test_x: tuple
) -> None:
    _copy_as(digits_bundle, repo / "broken", name="broken", cut="no.such.node")
    request = requests_for(digits_bundle, test_x[0][:1], 0.5, 4)[0]

    async def main() -> tuple[list[str], grpc.StatusCode]:
        async with connected(config(repo)) as (server, stub):
            names = [e.name for e in server.repo.models()]
            return names, await _code(stub.Infer(request, timeout=30))

    assert asyncio.run(main()) == (["digits"], grpc.StatusCode.OK)


def test_a_retry_after_a_new_version_appears_is_still_the_same_request(
    repo: Path, digits_bundle: Path, test_x: tuple
) -> None:
    request = requests_for(digits_bundle, test_x[0][:1], 0.5, 4)[0]

    async def main() -> tuple[pb.InferResponse, pb.InferResponse]:
        async with connected(config(repo, poll_s=3600)) as (server, stub):
            first = await stub.Infer(request, timeout=30)
            _copy_as(digits_bundle, repo / "digits-v2", version="v2")
            await server.rescan(force=True)
            return first, await stub.Infer(request, timeout=30)

    first, retry = asyncio.run(main())
    assert retry.cached and retry.top == first.top


def test_an_unexpected_failure_is_internal_and_fails_only_its_request(
    repo: Path, digits_bundle: Path, test_x: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tandem.cloud.compute

    requests = requests_for(digits_bundle, test_x[0][:3], 0.5, 4)
    real = tandem.cloud.compute.run_targets

    def flaky(targets: list) -> list:
        if any(t.payload == requests_payload[1] for t in targets):
            raise RuntimeError("boom")
        return real(targets)

    requests_payload = [from_message(r.features) for r in requests]
    monkeypatch.setattr(tandem.cloud.compute, "run_targets", flaky)

    async def main() -> tuple[list[grpc.StatusCode], list[pb.StreamResult]]:
        # One request per batch, so the failing one fails alone.
        async with connected(config(repo, max_batch=1)) as (_server, stub):
            unary = [await _code(stub.Infer(r, timeout=30)) for r in requests]
            for r in requests:
                r.request_id += "-s"
            stream = [x async for x in stub.InferStream(iter(requests), timeout=30)]
            return unary, stream

    unary, stream = asyncio.run(main())
    ok, internal = grpc.StatusCode.OK, grpc.StatusCode.INTERNAL
    assert unary == [ok, internal, ok]
    codes = {r.request_id: r.error.code for r in stream}
    assert codes == {"r0-s": 0, "r1-s": internal.value[0], "r2-s": 0}


def test_list_adapters_with_unparseable_bytes_is_invalid_argument(repo: Path) -> None:
    async def main() -> grpc.StatusCode:
        async with running(config(repo)) as server, grpc.aio.insecure_channel(server.address) as ch:
            raw = ch.unary_unary("/tandem.v1.SplitInference/ListAdapters")
            return await _code(raw(b"\xff\xff\xff", timeout=30))

    assert asyncio.run(main()) == grpc.StatusCode.INVALID_ARGUMENT


def test_the_client_retries_a_full_queue_but_not_a_message_too_large(
    repo: Path, digits_bundle: Path, test_x: tuple
) -> None:
    from tandem.edge.client import CloudClient

    first, second = requests_for(digits_bundle, test_x[0][:2], 0.5, 4)
    huge = pb.InferRequest()
    huge.CopyFrom(first)
    huge.request_id = "huge"
    huge.features.payload = b"\0" * 20_000
    retried: list[grpc.StatusCode] = []
    cfg = config(repo, max_queue=1, max_delay_ms=300, max_batch=64, max_message_bytes=16384)

    async def main() -> tuple[pb.InferResponse, grpc.StatusCode]:
        async with running(cfg) as server, CloudClient(server.address, seed=0) as c1:
            queued = asyncio.ensure_future(c1.infer(first))
            while server.batcher.queued == 0:
                await asyncio.sleep(0.01)
            async with CloudClient(server.address, seed=1, on_retry=retried.append) as c2:
                answer = await c2.infer(second)  # refused while the queue is full, then served
                await queued
                retried_before = len(retried)
                try:
                    await c2.infer(huge)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                assert len(retried) == retried_before, "a message too large is not retried"
                return answer.response, code

    response, code = asyncio.run(main())
    assert response.top and retried and set(retried) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_taken_ports_fail_the_start_with_a_clear_error(repo: Path) -> None:
    async def main() -> tuple[str, str]:
        async with running(config(repo)) as first:
            messages = []
            for cfg in (
                config(repo, listen=first.address, metrics_listen=None),
                config(repo, metrics_listen=f"127.0.0.1:{first.metrics_port}"),
            ):
                with pytest.raises(OSError) as caught:
                    await CloudServer(cfg).start()
                messages.append(str(caught.value))
            return messages[0], messages[1]

    listen, metrics = asyncio.run(main())
    assert listen.startswith("cannot listen on 127.0.0.1:")
    assert metrics.startswith("cannot serve metrics on 127.0.0.1:")
