"""Limits the service sets on its peers: streams, connections, idle time, cache bytes, ports.

Each test drives a real in-process server over loopback gRPC with a limit set small, and
observes the limit from the client side (a queued stream, a refused connection, a GOAWAY),
or, for the response cache, measures its memory with tracemalloc rather than trusting its
own accounting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from pydantic import ValidationError
from serving import config, ended_stream, make_repo, requests_for, running

from tandem.cloud.config import ServeConfig
from tandem.cloud.server import CloudServer
from tandem.data import load_data
from tandem.wire.v1 import split_inference_pb2 as pb
from tandem.wire.v1 import split_inference_pb2_grpc as pb_grpc

TIMEOUT = 20.0  # a bound on every wait: a limit that does not hold fails, it does not hang
Code = grpc.StatusCode


@pytest.fixture()
def repo(tmp_path: Path, digits_bundle: Path) -> Path:
    return make_repo(tmp_path, digits_bundle)


async def until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def holds_for(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether ``condition`` stays true for ``seconds`` (checked every 20 ms)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            return False
        await asyncio.sleep(0.02)
    return condition()


# ---------------------------------------------------------------------------- streams


def _stream_request(base: pb.InferRequest, i: int, answers_read: int = 0) -> pb.InferRequest:
    request = pb.InferRequest()
    request.CopyFrom(base)
    request.request_id, request.answers_read = f"s{i}", answers_read
    return request


def test_a_stream_that_never_reads_has_at_most_its_window_computed(
    repo: Path, digits_bundle: Path
) -> None:
    """A client that writes 2,000 requests and reads nothing has max_stream_inflight answers
    computed, not thousands: the request past the window ends the stream.

    The client's HTTP/2 window is left to grow as gRPC grows it (bandwidth-delay probing on),
    which is what let a non-reading client take on thousands of answers before. Once writing
    stops, the client reads what the stream delivered: the answers of the requests taken on,
    then RESOURCE_EXHAUSTED naming the window. The refused request is counted.
    """
    inflight, n = 4, 2000
    base = requests_for(digits_bundle, load_data("digits").test.x[:1], 1.0, 8)[0]

    async def main() -> tuple[int, list[pb.StreamResult], grpc.aio.AioRpcError, float]:
        server = CloudServer(config(repo, max_stream_inflight=inflight, drain_grace_s=0.5))
        submitted = 0
        try:
            await server.start()
            submit = server.batcher.submit

            def counted(*args: object, **kwargs: object) -> object:
                nonlocal submitted
                submitted += 1
                return submit(*args, **kwargs)  # type: ignore[arg-type]

            server.batcher.submit = counted  # type: ignore[method-assign,assignment]
            async with grpc.aio.insecure_channel(server.address) as channel:
                call = pb_grpc.SplitInferenceStub(channel).InferStream(timeout=TIMEOUT)
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    for i in range(n):  # writes fail once the server has ended the call
                        await asyncio.wait_for(call.write(_stream_request(base, i)), TIMEOUT)
                results: list[pb.StreamResult] = []
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    async for result in call:
                        results.append(result)
                refused = server.metrics.errors.labels("InferStream", "", "RESOURCE_EXHAUSTED")
                return submitted, results, ended.value, refused._value.get()
        finally:
            await server.drain()

    submitted, results, ended, refused = asyncio.run(main())
    assert submitted == inflight
    assert sorted(r.request_id for r in results) == [f"s{i}" for i in range(inflight)]
    assert all(r.HasField("response") for r in results)
    assert ended.code() == Code.RESOURCE_EXHAUSTED
    assert f"max_stream_inflight={inflight}" in (ended.details() or "")
    assert refused == 1


def test_a_client_that_reports_its_reads_streams_past_the_window(
    repo: Path, digits_bundle: Path
) -> None:
    """Ten windows' worth of requests on one stream, never more than the window unread, each
    request carrying the count read: every one is answered and the stream ends OK."""
    inflight, n = 4, 40
    base = requests_for(digits_bundle, load_data("digits").test.x[:1], 1.0, 8)[0]

    async def main() -> list[pb.StreamResult]:
        async with (
            running(config(repo, max_stream_inflight=inflight)) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            call = pb_grpc.SplitInferenceStub(channel).InferStream(timeout=TIMEOUT)
            results: list[pb.StreamResult] = []
            for i in range(n):
                if i - len(results) == inflight:  # the window is full: read one first
                    results.append(await call.read())
                await call.write(_stream_request(base, i, answers_read=len(results)))
            await call.done_writing()
            while (result := await call.read()) is not grpc.aio.EOF:
                results.append(result)
            assert await call.code() == Code.OK
            return results

    results = asyncio.run(main())
    assert sorted(r.request_id for r in results) == sorted(f"s{i}" for i in range(n))
    assert all(r.HasField("response") for r in results)


def test_claiming_answers_never_sent_ends_the_stream(repo: Path, digits_bundle: Path) -> None:
    """A first request that says 5 answers were read, when none was sent, is a lie: the
    stream ends with INVALID_ARGUMENT and the request is not computed."""
    base = requests_for(digits_bundle, load_data("digits").test.x[:1], 1.0, 8)[0]

    results, ended = asyncio.run(
        ended_stream(config(repo), [_stream_request(base, 0, answers_read=5)], TIMEOUT)
    )
    assert results == []
    assert ended.code() == Code.INVALID_ARGUMENT
    assert "answers_read 5 exceeds the 0 answers sent" in (ended.details() or "")


def test_streams_per_connection_are_limited(repo: Path) -> None:
    """Past max_streams_per_connection, a further stream on that connection waits its turn."""

    async def main() -> None:
        cfg = config(repo, max_streams_per_connection=2, drain_grace_s=0.5)
        async with (
            running(cfg) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            stub = health_pb2_grpc.HealthStub(channel)
            # Connected first, so the client knows the limit (from the server's SETTINGS)
            # before it opens the streams; then one stream at a time.
            await _check(channel)
            watch = []
            for _ in range(2):
                watch.append(stub.Watch(health_pb2.HealthCheckRequest(), timeout=60))
                first = await asyncio.wait_for(watch[-1].read(), TIMEOUT)
                assert first.status == health_pb2.HealthCheckResponse.SERVING
            watch.append(stub.Watch(health_pb2.HealthCheckRequest(), timeout=60))
            third = asyncio.ensure_future(watch[2].read())
            # The third stream is not started while the two hold the connection's streams.
            assert await holds_for(lambda: not third.done(), 1.0)
            watch[0].cancel()
            message = await asyncio.wait_for(third, TIMEOUT)
            assert message.status == health_pb2.HealthCheckResponse.SERVING
            for w in watch:
                w.cancel()

    asyncio.run(main())


def _check(channel: grpc.aio.Channel) -> Awaitable[health_pb2.HealthCheckResponse]:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


def _own_connection(address: str) -> grpc.aio.Channel:
    # A local subchannel pool: channels to one address would otherwise share one connection.
    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def test_connections_are_limited(repo: Path) -> None:
    """Past max_connections, a new connection is refused until one closes."""

    async def main() -> None:
        async with running(config(repo, max_connections=2)) as server:
            held = [_own_connection(server.address) for _ in range(2)]
            for channel in held:
                await _check(channel)
            extra = _own_connection(server.address)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _check(extra)
                assert refused.value.code() == Code.UNAVAILABLE
                await held.pop().close()

                async def served() -> bool:
                    try:
                        await _check(extra)
                    except grpc.aio.AioRpcError:
                        return False
                    return True

                deadline = time.monotonic() + TIMEOUT
                while not await served():
                    assert time.monotonic() < deadline, "a freed connection slot was not reused"
                    await asyncio.sleep(0.1)
            finally:
                for channel in [*held, extra]:
                    await channel.close()

    asyncio.run(main())


def test_idle_connection_is_closed(repo: Path) -> None:
    """A connection with no call for idle_timeout_s is closed by the server (GOAWAY)."""

    async def main() -> None:
        async with (
            running(config(repo, idle_timeout_s=0.3)) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            await _check(channel)
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            await until(
                lambda: channel.get_state() != grpc.ChannelConnectivity.READY,
                "the server to close the idle connection",
            )

    asyncio.run(main())


def test_old_connection_with_an_idle_stream_is_closed(repo: Path) -> None:
    """A Health.Watch held open without a token ends once the connection reaches its age."""

    async def main() -> Code:
        cfg = config(repo, max_connection_age_s=0.5, drain_grace_s=0.5)
        async with (
            running(cfg) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=60
            )
            await asyncio.wait_for(watch.read(), TIMEOUT)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(watch.read(), TIMEOUT)
            return ended.value.code()

    assert asyncio.run(main()) == Code.UNAVAILABLE


# ---------------------------------------------------------------------------- unparseable


@pytest.mark.parametrize("method", ["ListModels", "GetServerInfo", "ListAdapters"])
def test_unparseable_listing_requests_are_invalid_argument(repo: Path, method: str) -> None:
    async def main() -> Code:
        async with (
            running(config(repo)) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            raw = channel.unary_unary(f"/tandem.v1.SplitInference/{method}")
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await raw(b"\xff\xff\xff", timeout=TIMEOUT)
            return failed.value.code()

    assert asyncio.run(main()) == Code.INVALID_ARGUMENT


# ---------------------------------------------------------------------------- response cache


def test_response_cache_is_bounded_by_bytes(repo: Path, digits_bundle: Path) -> None:
    """Answers with big logits fill the cache up to cache_max_bytes, not past it."""
    cap = 256 * 1024
    x = load_data("digits").test.x[:1]
    base = requests_for(digits_bundle, x, 1.0, 8)[0]
    base.return_logits = True

    async def main() -> tuple[int, int]:
        async with running(config(repo, cache_max_bytes=cap)) as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.SplitInferenceStub(channel)
                for i in range(3000):
                    request = pb.InferRequest()
                    request.CopyFrom(base)
                    request.request_id = f"c{i}-" + "k" * 100
                    await stub.Infer(request, timeout=TIMEOUT)
            cache = server.service.cache
            return cache.nbytes, len(cache)

    nbytes, entries = asyncio.run(main())
    assert nbytes <= cap
    assert 0 < entries < 3000


# ---------------------------------------------------------------------------- listening


@pytest.mark.parametrize("metrics", ["0.0.0.0:9464", "[::]:0", "192.0.2.10:9464"])
def test_metrics_off_loopback_needs_insecure(repo: Path, metrics: str) -> None:
    """The metrics port is plain HTTP: the same rule as a plain gRPC port, even under TLS."""
    with pytest.raises(ValidationError, match="--insecure"):
        ServeConfig(models=repo, metrics_listen=metrics)
    assert ServeConfig(models=repo, metrics_listen=metrics, insecure=True).insecure


def test_metrics_off_loopback_is_refused_under_tls_too(repo: Path, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    with pytest.raises(ValidationError, match="--insecure"):
        ServeConfig(
            models=repo, listen="0.0.0.0:0", metrics_listen="0.0.0.0:0", tls_cert=cert, tls_key=key
        )


def _reflect(channel: grpc.aio.Channel, version: str) -> Callable[..., object]:
    # v1 and v1alpha messages are the same on the wire: only the method path differs.
    return channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )


def test_reflection_v1_and_v1alpha(repo: Path) -> None:
    async def main() -> dict[str, list[reflection_pb2.ServerReflectionResponse]]:
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="grpc.reflection.v1.ServerReflection"
            ),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="tandem.v1.InferRequest"),
        ]
        async with (
            running(config(repo)) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            return {
                v: [a async for a in _reflect(channel, v)(iter(requests), timeout=TIMEOUT)]
                for v in ("v1", "v1alpha")
            }

    from google.protobuf import descriptor_pb2

    for version, (listed, reflection_file, tandem_file) in asyncio.run(main()).items():
        services = {s.name for s in listed.list_services_response.service}
        assert {
            "tandem.v1.SplitInference",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services, version
        (raw,) = reflection_file.file_descriptor_response.file_descriptor_proto
        described = descriptor_pb2.FileDescriptorProto.FromString(raw)
        assert described.package == "grpc.reflection.v1", version
        assert [s.name for s in described.service] == ["ServerReflection"]
        assert tandem_file.file_descriptor_response.file_descriptor_proto, version


# ---------------------------------------------------------------------------- command line


def test_cli_defaults_are_the_config_defaults(repo: Path) -> None:
    """Every ``cloud serve`` option left out gives ServeConfig's own default (one default)."""
    from tandem.cli import build_parser
    from tandem.cloud.cli import serve_config

    args = build_parser().parse_args(["cloud", "serve", "--models", str(repo)])
    from_cli = serve_config(args).model_dump(exclude={"server_id"})
    assert from_cli == ServeConfig(models=repo).model_dump(exclude={"server_id"})


def test_cli_passes_the_limits_on(repo: Path) -> None:
    from tandem.cli import build_parser
    from tandem.cloud.cli import serve_config

    given = {
        "--cache-max-bytes": "1000",
        "--max-stream-inflight": "3",
        "--max-streams-per-connection": "5",
        "--max-connections": "7",
        "--idle-timeout-s": "1.5",
        "--max-connection-age-s": "9",
        "--keepalive-s": "11",
    }
    argv = ["cloud", "serve", "--models", str(repo)]
    for option, value in given.items():
        argv += [option, value]
    cfg = serve_config(build_parser().parse_args(argv))
    got = {option: getattr(cfg, option[2:].replace("-", "_")) for option in given}
    assert got == {option: float(value) for option, value in given.items()}


# ---------------------------------------------------------------------------- health watchers


def test_a_silent_watch_ends_after_the_idle_timeout(repo: Path) -> None:
    """A Health.Watch without a token, on a connection that stays young, ends by itself."""

    async def main() -> None:
        cfg = config(repo, idle_timeout_s=0.5)
        async with (
            running(cfg) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=60
            )
            first = await asyncio.wait_for(watch.read(), TIMEOUT)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            assert await asyncio.wait_for(watch.read(), TIMEOUT) is grpc.aio.EOF
            assert await watch.code() == Code.OK

    asyncio.run(main())


def test_every_watcher_hears_the_drain_after_another_left(repo: Path) -> None:
    """grpc's stock servicer dropped a service's watchers when any one of them left."""

    async def main() -> int:
        async with (
            running(config(repo, drain_grace_s=1.0)) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            stub = health_pb2_grpc.HealthStub(channel)
            leaving = stub.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            staying = stub.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            for watch in (leaving, staying):
                await asyncio.wait_for(watch.read(), TIMEOUT)
            leaving.cancel()
            await until(lambda: leaving.done(), "the first watcher to leave")
            # Give the server a moment to see it go (only the old bug needed that ordering to
            # show; the check below holds either way).
            await asyncio.sleep(0.1)
            draining = asyncio.ensure_future(server.drain())
            try:
                heard = await asyncio.wait_for(staying.read(), TIMEOUT)
            finally:
                await draining
            return heard.status

    assert asyncio.run(main()) == health_pb2.HealthCheckResponse.NOT_SERVING
