"""Stream contexts: a streamed request carries its payload and a few bytes, and stays
idempotent across streams."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from serving import config, ended_stream, make_repo, running

from tandem.bundle import HeadRunner
from tandem.cloud.errors import RequestError
from tandem.cloud.stream_contexts import (
    MAX_CONTEXTS,
    MAX_NAME,
    MAX_NAMESPACE,
    DefinitionError,
    StreamContexts,
)
from tandem.data import load_data
from tandem.wire.v1 import split_inference_pb2 as pb
from tandem.wire.v1 import split_inference_pb2_grpc as pb_grpc

WIDTH = 0.5
Code = grpc.StatusCode


def _definition(context: int = 1, namespace: str = "device-7/run-1") -> pb.InferRequest:
    return pb.InferRequest(
        request_id=namespace, model="digits", width=WIDTH, context=context, top_k=3
    )


def test_a_definition_alone_is_not_served_and_fills_later_requests() -> None:
    contexts = StreamContexts()
    assert contexts.resolve(_definition()) is None
    full = contexts.resolve(pb.InferRequest(context=1, seq=42, payload=b"\x88\x01"))
    assert full is not None
    assert (full.model, full.width, full.top_k) == ("digits", WIDTH, 3)
    assert full.request_id == "device-7/run-1#42" and full.payload == b"\x88\x01"
    # Its own request_id, when it sends one, is the key instead.
    own = contexts.resolve(pb.InferRequest(context=1, request_id="x", payload=b"\x88"))
    assert own is not None and own.request_id == "x"


def test_a_full_request_with_a_context_is_served_and_defines_it() -> None:
    contexts = StreamContexts()
    request = _definition()
    request.payload = b"\x88\x02"
    assert contexts.resolve(request) is request
    assert 1 in contexts.defined


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.InferRequest(context=2, seq=1, payload=b"\x88"), "context 2 is not defined"),
        (_definition(namespace=""), "namespace"),
        (_definition(namespace="n" * (MAX_NAMESPACE + 1)), "namespace"),
    ],
)
def test_what_a_context_cannot_serve_fails_alone(request_: pb.InferRequest, message: str) -> None:
    contexts = StreamContexts()
    with pytest.raises(RequestError, match=message) as refused:
        contexts.resolve(request_)
    assert refused.value.code == Code.INVALID_ARGUMENT


def test_contexts_per_stream_are_bounded_and_redefining_replaces() -> None:
    contexts = StreamContexts()
    for n in range(1, MAX_CONTEXTS + 1):
        contexts.resolve(_definition(n))
    contexts.resolve(_definition(1, "another"))  # replaces: still within the bound
    assert contexts.defined[1].request_id == "another"
    with pytest.raises(RequestError, match=f"at most {MAX_CONTEXTS}"):
        contexts.resolve(_definition(MAX_CONTEXTS + 1))


# ------------------------------------------------------------------ over gRPC


@pytest.fixture()
def repo(tmp_path: Path, digits_entropy_bundle: Path) -> Path:
    return make_repo(tmp_path, digits_entropy_bundle)


def _compact(payloads: list[bytes]) -> list[pb.InferRequest]:
    return [pb.InferRequest(context=1, seq=i, payload=p) for i, p in enumerate(payloads)]


async def _stream(address: str, messages: list[pb.InferRequest]) -> list[pb.StreamResult]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.SplitInferenceStub(channel).InferStream(iter(messages), timeout=60)
        return [r async for r in call]


def test_compact_requests_answer_as_full_ones_and_are_small(
    repo: Path, digits_entropy_bundle: Path
) -> None:
    x = load_data("digits").test.x[:20]
    payloads = HeadRunner.from_bundle(digits_entropy_bundle).encode_entropy(x, WIDTH, 0)
    compact = _compact(payloads)
    for request, payload in zip(compact, payloads, strict=True):
        assert request.ByteSize() <= len(payload) + 12
    full = [
        pb.InferRequest(request_id=f"full-{i}", model="digits", width=WIDTH, payload=p, top_k=3)
        for i, p in enumerate(payloads)
    ]

    async def main() -> tuple[list[pb.StreamResult], list[pb.StreamResult], list[pb.StreamResult]]:
        async with running(config(repo)) as server:
            first = await _stream(server.address, [_definition(), *compact])
            again = await _stream(server.address, [_definition(), *compact])  # retried
            plain = await _stream(server.address, full)
            return first, again, plain

    first, again, plain = asyncio.run(main())
    assert len(first) == len(payloads)  # the definition got no answer
    by_seq = {r.seq: r for r in first}
    assert set(by_seq) == set(range(len(payloads))) and all(r.request_id == "" for r in first)
    expected = {int(r.request_id.split("-")[1]): r.response.top[0].index for r in plain}
    assert {s: r.response.top[0].index for s, r in by_seq.items()} == expected
    assert all(len(r.response.top) == 3 for r in first)  # top_k came from the context
    # The same definition on a new stream: the same keys, answered from the cache.
    assert all(r.response.cached for r in again) and not any(r.response.cached for r in first)


def test_an_undefined_context_fails_alone_on_the_stream(
    repo: Path, digits_entropy_bundle: Path
) -> None:
    x = load_data("digits").test.x[:3]
    payloads = HeadRunner.from_bundle(digits_entropy_bundle).encode_entropy(x, WIDTH, 1)
    messages = [_definition(), *_compact(payloads)]
    messages[2].context = 9

    async def main() -> list[pb.StreamResult]:
        # A window of 3 holds the 3 requests: the definition takes no place in it.
        async with running(config(repo, max_stream_inflight=3)) as server:
            return await _stream(server.address, messages)

    results = {r.seq: r for r in asyncio.run(main())}
    assert results[1].error.code == Code.INVALID_ARGUMENT.value[0]
    assert "context 9 is not defined" in results[1].error.message
    assert results[0].HasField("response") and results[2].HasField("response")


def test_a_definition_with_an_overlong_name_is_refused() -> None:
    request = _definition()
    request.model = "m" * (MAX_NAME + 1)
    with pytest.raises(DefinitionError, match=f"at most {MAX_NAME}"):
        StreamContexts().resolve(request)


def test_a_definition_the_stream_cannot_keep_ends_it_after_the_answers_taken_on(
    repo: Path, digits_entropy_bundle: Path
) -> None:
    """It takes no place in the window and gets no answer of its own: the stream ends with
    INVALID_ARGUMENT once the requests before it are answered."""
    x = load_data("digits").test.x[:2]
    payloads = HeadRunner.from_bundle(digits_entropy_bundle).encode_entropy(x, WIDTH, 0)
    bad = _definition(2, namespace="n" * (MAX_NAMESPACE + 1))
    messages = [_definition(), *_compact(payloads), bad, *_compact(payloads)]

    results, ended = asyncio.run(ended_stream(config(repo, max_stream_inflight=2), messages))
    assert sorted(r.seq for r in results) == [0, 1] and all(r.HasField("response") for r in results)
    assert ended.code() == Code.INVALID_ARGUMENT and "namespace" in (ended.details() or "")


def test_bytes_that_do_not_parse_take_a_place_in_the_window(
    repo: Path, digits_entropy_bundle: Path
) -> None:
    """An unparsed message is answered (INVALID_ARGUMENT, on its own) and reports nothing
    read: with a window of 1, a valid request after it is one too many."""
    x = load_data("digits").test.x[:1]
    payload = HeadRunner.from_bundle(digits_entropy_bundle).encode_entropy(x, WIDTH, 0)[0]
    valid = pb.InferRequest(request_id="v", model="digits", width=WIDTH, payload=payload)
    messages = [b"\xff\xff\xff", valid.SerializeToString()]

    async def main() -> tuple[list[bytes], grpc.aio.AioRpcError]:
        async with (
            running(config(repo, max_stream_inflight=1)) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            raw = channel.stream_stream(
                "/tandem.v1.SplitInference/InferStream",
                request_serializer=None,
                response_deserializer=None,
            )
            call = raw(iter(messages), timeout=30)
            answers: list[bytes] = []
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async for answer in call:
                    answers.append(answer)
            return answers, ended.value

    answers, ended = asyncio.run(main())
    (only,) = [pb.StreamResult.FromString(a) for a in answers]
    assert only.error.code == Code.INVALID_ARGUMENT.value[0]
    assert ended.code() == Code.RESOURCE_EXHAUSTED
