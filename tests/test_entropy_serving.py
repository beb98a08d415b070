"""The service answers entropy-coded (v2) features sent whole in ``InferRequest.payload``,
with the accuracy ``tandem eval`` measured, and refuses what its bundle cannot decode."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
from serving import config, make_repo, running

from tandem.bundle import HeadRunner, TailRunner, read_manifest
from tandem.data import load_data
from tandem.protocol import to_message
from tandem.wire.v1 import split_inference_pb2 as pb
from tandem.wire.v1 import split_inference_pb2_grpc as pb_grpc

Code = grpc.StatusCode
WIDTH = 0.5


@pytest.fixture()
def repo(tmp_path: Path, digits_entropy_bundle: Path) -> Path:
    return make_repo(tmp_path, digits_entropy_bundle)


def _requests(payloads: list[bytes], prefix: str = "r") -> list[pb.InferRequest]:
    return [
        pb.InferRequest(request_id=f"{prefix}{i}", model="digits", width=WIDTH, payload=p)
        for i, p in enumerate(payloads)
    ]


async def _infer_all(address: str, requests: list[pb.InferRequest]) -> list[pb.InferResponse]:
    """Unary calls, 32 at a time (below the server's streams per connection)."""
    slots = asyncio.Semaphore(32)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.SplitInferenceStub(channel)

        async def one(request: pb.InferRequest) -> pb.InferResponse:
            async with slots:
                return await stub.Infer(request, timeout=60)

        return list(await asyncio.gather(*(one(r) for r in requests)))


async def _code(address: str, request: pb.InferRequest) -> tuple[Code, str]:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await pb_grpc.SplitInferenceStub(channel).Infer(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return Code.OK, ""


@pytest.mark.parametrize("compute", ["threads", "processes"])
def test_served_entropy_points_match_the_measured_table(
    repo: Path, digits_entropy_bundle: Path, compute: str
) -> None:
    """Every test digit, at each rate point: the served predictions score exactly the
    accuracy in the bundle's table (threads), or the same predictions (a worker process)."""
    test = load_data("digits").test
    head = HeadRunner.from_bundle(digits_entropy_bundle)
    table = {
        p.point: p.accuracy
        for p in read_manifest(digits_entropy_bundle).table
        if p.codec == "entropy" and p.width == WIDTH
    }
    n = len(test.y) if compute == "threads" else 32
    cfg = config(repo, compute=compute)

    async def main() -> dict[int, np.ndarray]:
        async with running(cfg) as server:
            out = {}
            for point in table:
                payloads = head.encode_entropy(test.x[:n], WIDTH, point)
                answers = await _infer_all(server.address, _requests(payloads, f"p{point}-"))
                out[point] = np.array([a.top[0].index for a in answers])
            return out

    predictions = asyncio.run(main())
    for point, predicted in predictions.items():
        if compute == "threads":
            assert float((predicted == test.y).mean()) == table[point]
        else:
            payloads = head.encode_entropy(test.x[:n], WIDTH, point)
            expected = head_tail_predictions(digits_entropy_bundle, payloads)
            assert np.array_equal(predicted, expected)


def head_tail_predictions(bundle: Path, payloads: list[bytes]) -> np.ndarray:
    return TailRunner.from_bundle(bundle).infer(payloads, WIDTH).argmax(1)


def test_v1_bytes_in_payload_answer_as_features_do(repo: Path, digits_entropy_bundle: Path) -> None:
    x = load_data("digits").test.x[:16]
    payloads = HeadRunner.from_bundle(digits_entropy_bundle).encode(x, WIDTH, 4)

    async def main() -> tuple[list[int], list[int]]:
        async with running(config(repo)) as server:
            whole = await _infer_all(server.address, _requests(payloads))
            split = [
                pb.InferRequest(
                    request_id=f"f{i}", model="digits", width=WIDTH, features=to_message(p)
                )
                for i, p in enumerate(payloads)
            ]
            parted = await _infer_all(server.address, split)
            return [a.top[0].index for a in whole], [a.top[0].index for a in parted]

    whole, parted = asyncio.run(main())
    assert whole == parted


def test_what_the_bundle_cannot_decode_is_invalid_argument(
    repo: Path, digits_entropy_bundle: Path, digits_bundle: Path, tmp_path: Path
) -> None:
    x = load_data("digits").test.x[:1]
    head = HeadRunner.from_bundle(digits_entropy_bundle)
    good = head.encode_entropy(x, WIDTH, 0)[0]
    cap = 2 * int(np.prod(read_manifest(digits_entropy_bundle).bottleneck.shapes[str(WIDTH)]))
    cases = {
        "rate point 7": bytes([good[0] | 0x07]) + good[1:],
        "the request says 0.5": bytes([0x80 | 3 << 3]) + good[1:],  # coded at width 1.0
        "symbols take at most": good[:1] + bytes(cap + 64),
        "set payload or features": None,
    }
    plain = make_repo(tmp_path / "plain", digits_bundle, "plain")

    async def main() -> dict[str, tuple[Code, str]]:
        out = {}
        async with running(config(repo)) as server:
            for what, payload in cases.items():
                request = _requests([payload or good])[0]
                if payload is None:
                    request.features.CopyFrom(to_message(head.encode(x, WIDTH, 4)[0]))
                out[what] = await _code(server.address, request)
        async with running(config(plain)) as server:
            request = _requests([good])[0]  # a format-1 bundle, also named digits
            out["has 0"] = await _code(server.address, request)
        return out

    for what, (code, details) in asyncio.run(main()).items():
        assert code == Code.INVALID_ARGUMENT, (what, code, details)
        assert what in details, (what, details)


def test_garbage_after_a_valid_header_byte_never_crashes_the_service(repo: Path) -> None:
    """A range decoder maps most bytes to some symbols: such requests are answered or
    refused with INVALID_ARGUMENT, never an internal error, and the service stays up."""
    rng = np.random.default_rng(0)
    payloads = [bytes([0x88 | int(rng.integers(2))]) + rng.bytes(int(rng.integers(0, 40)))
                for _ in range(64)]  # fmt: skip

    async def main() -> list[Code]:
        async with running(config(repo)) as server:
            codes = [(await _code(server.address, r))[0] for r in _requests(payloads)]
            # Still serving afterwards.
            ok = await _code(server.address, _requests([payloads[0]], "again")[0])
            return [*codes, ok[0]]

    codes = asyncio.run(main())
    assert set(codes) <= {Code.OK, Code.INVALID_ARGUMENT}, set(codes)


def test_list_models_shows_the_rate_points(repo: Path, digits_entropy_bundle: Path) -> None:
    async def main() -> pb.ListModelsResponse:
        async with (
            running(config(repo)) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            return await pb_grpc.SplitInferenceStub(channel).ListModels(pb.ListModelsRequest())

    (model,) = asyncio.run(main()).models
    table = read_manifest(digits_entropy_bundle).table
    listed = [(p.codec, p.width, p.bits, p.point) for p in model.table]
    assert listed == [(p.codec, p.width, p.bits or 0, p.point or 0) for p in table]
    for sent, point in zip(model.table, table, strict=True):
        if point.codec == "entropy":
            assert sent.beta == pytest.approx(point.beta) and sent.entropy_bits > 0
