"""Bad input never hurts the cloud service: a flood of malformed requests on one server.

Over 1,200 malformed ``Infer`` calls go to one in-process server, sent as raw bytes through
a method with no serializer so that bytes no client stub would produce arrive too: random
garbage, truncated and bit-flipped requests (a flip inside feature values can leave a valid
request, which must then be answered), and requests built field by field to break one rule
each (shapes, dtypes, lying codec headers, zstd bombs, NaN/inf, unknown models, oversized
messages). Every call must end with the status the error model (proto/tandem/v1) names, valid
requests mixed into the flood and sent after it must be answered correctly, the health check
must still say SERVING, and the process memory must stay bounded.

Bytes that do not parse as an ``InferRequest`` get INVALID_ARGUMENT from the service's
tolerant deserializer (left to itself, grpc.aio would answer UNKNOWN and log a traceback
per call). The last tests pin down three ways bad input once got a wrong answer: echoed
long names overflowing grpc's metadata limit, unknown model names growing the metrics,
and features that overflow the tail answered with NaN scores.
"""

from __future__ import annotations

import asyncio
import io
import math
import random
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import zstandard
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from serving import config, make_repo, requests_for, running

from tandem import codec
from tandem.bundle import TailRunner, read_manifest
from tandem.data import load_data
from tandem.protocol import from_message
from tandem.wire.v1 import split_inference_pb2 as pb

Code = grpc.StatusCode
INFER = "/tandem.v1.SplitInference/Infer"
MAX_BYTES = 64 * 1024  # the server's max_message_bytes in these tests
SEED = 20240611
IN_FLIGHT = 32
RSS_BOUND_KIB = 200 * 1024
# What grpc.aio answers (itself) for bytes that do not parse as the request type.
UNPARSEABLE = "request does not parse as tandem.v1.InferRequest"
UNPARSED = Code.INVALID_ARGUMENT


def _parses(data: bytes) -> bool:
    try:
        pb.InferRequest.FromString(data)
    except DecodeError:
        return False
    return True


@dataclass(frozen=True)
class Case:
    """One call: the bytes sent, the codes it may end with, and what its details must say."""

    kind: str
    data: bytes
    allowed: frozenset[Code]
    detail: str = ""
    label: int | None = None  # for a valid request: the class the tail predicts


@dataclass(frozen=True)
class Outcome:
    code: Code
    details: str
    response: bytes | None


# ------------------------------------------------------------------------- zstd frames


def _rle_frame(declared: int | None, runs: Sequence[int], byte: int = 0) -> bytes:
    """A zstd frame (RFC 8878) of RLE blocks, built by hand so its header can lie.

    ``declared`` is the Frame_Content_Size written (None: none written); each run is one
    RLE block repeating ``byte`` (at most 128 KiB, the 128 KiB window's block limit). Four
    bytes per block expand to up to 128 KiB: far more than any header in this test admits.
    """
    out = bytearray(b"\x28\xb5\x2f\xfd")  # magic number
    if declared is None:
        out += bytes([0x00, 0x38])  # no content size, window 2**17
    else:
        out += bytes([0x80, 0x38]) + declared.to_bytes(4, "little")  # 4-byte content size
    for i, n in enumerate(runs):
        last = int(i == len(runs) - 1)
        out += (last | 1 << 1 | n << 3).to_bytes(3, "little") + bytes([byte])
    return bytes(out)


def _zeros_frame(total: int, *, declare: bool) -> bytes:
    """A real zstd frame of ``total`` zero bytes, compressed in 1 MiB pieces.

    Streaming keeps the expanded data out of this process: a 1 GiB frame is about 32 KiB.
    """
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=declare)
    obj = cctx.compressobj(size=total if declare else -1)
    chunk = bytes(1 << 20)
    parts = [obj.compress(chunk) for _ in range(total >> 20)]
    parts.append(obj.flush())
    return b"".join(parts)


BOMB_BYTES = 1 << 30
BLOCK = 1 << 17


# ------------------------------------------------------------------------- the bundle's rules


class Bases:
    """Valid requests at every width and bits, the bundle's rules, and the prebuilt bombs."""

    def __init__(self, bundle: Path, x: np.ndarray) -> None:
        manifest = read_manifest(bundle)
        self.version = manifest.version
        self.shapes = {float(w): tuple(s) for w, s in manifest.bottleneck.shapes.items()}
        self.valid = {
            (w, bits): requests_for(bundle, x, w, bits, prefix=f"base-{w}-{bits}-")
            for w in self.shapes
            for bits in codec.SUPPORTED_BITS
        }
        self.tail = TailRunner.from_bundle(bundle)
        self.bomb_declared = _zeros_frame(BOMB_BYTES, declare=True)
        self.bomb_undeclared = _zeros_frame(BOMB_BYTES, declare=False)

    def pick(
        self,
        rng: random.Random,
        bits: Sequence[int] = codec.SUPPORTED_BITS,
        widths: Sequence[float] | None = None,
    ) -> pb.InferRequest:
        """A copy of a valid request under a fresh id.

        Ids carry 64 random bits, so no bit flip turns one into another and no two calls
        meet in the idempotency cache.
        """
        key = (rng.choice(list(widths or self.shapes)), rng.choice(list(bits)))
        req = pb.InferRequest()
        req.CopyFrom(rng.choice(self.valid[key]))
        req.request_id = f"id-{rng.getrandbits(64):016x}"
        return req

    def label(self, req: pb.InferRequest) -> int:
        return int(self.tail.infer([from_message(req.features)]).argmax())


def _reference_code(req: pb.InferRequest, b: Bases) -> Code:
    """The code the error model gives a parsed request, its checks in the service's order.

    An oracle for the random cases, and a cross-check of the labels of the built ones.
    """
    if not 0 < len(req.request_id) <= 128:
        return Code.INVALID_ARGUMENT
    if req.model != "digits" or req.version not in ("", b.version):
        return Code.NOT_FOUND
    if req.adapter:
        return Code.NOT_FOUND  # the bundle has no adapters
    if req.adapter_version:
        return Code.INVALID_ARGUMENT
    width = next((w for w in b.shapes if abs(w - req.width) < 1e-6), None)
    if width is None or not req.HasField("features"):
        return Code.INVALID_ARGUMENT
    shape = b.shapes[width]
    try:
        decoded = codec.decode(from_message(req.features), max_elements=math.prod(shape))
    except codec.CodecError:
        return Code.INVALID_ARGUMENT
    return Code.OK if decoded.shape == shape else Code.INVALID_ARGUMENT


def _oracle(data: bytes, b: Bases) -> frozenset[Code]:
    """Codes allowed for arbitrary bytes: size first (gRPC), then parsing, then the model."""
    if len(data) > MAX_BYTES:
        return frozenset({Code.RESOURCE_EXHAUSTED})
    try:
        req = pb.InferRequest.FromString(data)
    except DecodeError:
        return frozenset({UNPARSED})
    code = _reference_code(req, b)
    if code == Code.OK and req.deadline_ms:
        # A flip can create a deadline_ms of a few ms, which may pass while queued.
        return frozenset({Code.OK, Code.DEADLINE_EXCEEDED})
    return frozenset({code})


# ------------------------------------------------------------------------- malformed by design


def _packed(req: pb.InferRequest) -> int:
    n = math.prod(req.features.shape)
    return 2 * n if req.features.bits == 16 else n * req.features.bits // 8


def _quantized(rng: random.Random, b: Bases) -> pb.InferRequest:
    return b.pick(rng, bits=(8, 4, 2))


def _shape_dim_off(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    shape = list(req.features.shape)
    shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 2, 3])  # every dimension is >= 2
    req.features.shape[:] = shape
    return req


def _reshaped(rng: random.Random, b: Bases) -> pb.InferRequest:
    # Same element count, so the 16-bit codec header is consistent; only the width objects.
    req = b.pick(rng, bits=(16,))
    c, h, w = req.features.shape
    req.features.shape[:] = rng.choice([[c * h, w], [c * h * w], [1, c, h, w], [c, h * w, 1]])
    return req


def _narrower_features(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng, widths=[0.5, 0.75, 1.0])
    req.features.CopyFrom(b.pick(rng, widths=[w for w in b.shapes if w < req.width]).features)
    return req


def _wider_features(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng, widths=[0.25, 0.5, 0.75])
    req.features.CopyFrom(b.pick(rng, widths=[w for w in b.shapes if w > req.width]).features)
    return req


def _untrained_width(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    req.width = rng.choice(
        [0.3, math.nan, -1.0, math.inf, -math.inf, 0.0, 0.5005, 1e30, 0.25 - 2e-6, 2.0, -0.5]
    )
    return req


def _dtype_enum(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    req.features.dtype = rng.choice([3, 7, 100, 2**31 - 1, -1])  # proto3 enums are open
    return req


def _codec_version(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    req.features.codec_version = rng.choice([0, 2, 3, 15, 16, 2**32 - 1])
    return req


def _bits(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    req.features.bits = rng.choice([0, 1, 3, 5, 7, 12, 32, 64, 2**32 - 1])
    return req


def _too_many_dims(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    req.features.shape[:] = [rng.randint(1, 4) for _ in range(rng.randint(7, 15))]
    return req


def _zero_dim(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    shape = list(req.features.shape)
    shape[rng.randrange(len(shape))] = 0
    req.features.shape[:] = shape
    return req


def _dim_over_cap(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    req.features.shape[:] = rng.choice(
        [[2**31, 4, 4], [2**32 - 1], [2**24 + 1, 1, 1], [4, 4, 2**31 + 7], [2**30] * 6]
    )
    return req


def _gigantic_tensor(rng: random.Random, b: Bases) -> pb.InferRequest:
    # Every dimension within the codec's cap, the element count far beyond the width's.
    req = b.pick(rng)
    req.features.shape[:] = rng.choice([[2**24] * 3, [2**24] * 6, [8, 4, 2**24], [2**12] * 4])
    return req


def _params_short(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = _quantized(rng, b)
    req.features.params = req.features.params[: rng.randrange(len(req.features.params))]
    return req


def _params_long(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)  # a 16-bit tensor has no parameters at all
    req.features.params += rng.randbytes(rng.randint(1, 16))
    return req


def _payload_short(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    req.features.payload = req.features.payload[: rng.randrange(len(req.features.payload))]
    return req


def _payload_long(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    req.features.payload += rng.randbytes(rng.randint(1, 64))
    return req


def _fp32_flag_lie(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    req.features.fp32_params = not req.features.fp32_params
    return req


def _zstd_flag_lie_on(rng: random.Random, b: Bases) -> pb.InferRequest:
    # Raw payload flagged as zstd: whole (not smaller) or cut short (not a frame).
    req = b.pick(rng)
    assert not req.features.zstd
    req.features.zstd = True
    if rng.random() < 0.5:
        req.features.payload = req.features.payload[: rng.randrange(len(req.features.payload))]
    return req


def _zstd_flag_lie_off(rng: random.Random, b: Bases) -> pb.InferRequest:
    # A genuine frame of the packed payload, not flagged: its length is not the packed size.
    req = b.pick(rng)
    req.features.payload = zstandard.ZstdCompressor().compress(req.features.payload)
    return req


def _bomb_declared(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    req.features.zstd, req.features.payload = True, b.bomb_declared
    return req


def _bomb_undeclared(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    req.features.zstd, req.features.payload = True, b.bomb_undeclared
    return req


def _small_bomb(rng: random.Random, b: Bases) -> pb.InferRequest:
    # Claims exactly the packed size and is smaller than it, so it passes every header check
    # and reaches the decompressor; its blocks expand to megabytes.
    req = b.pick(rng, bits=(16,))
    blocks = (_packed(req) - 11) // 4
    req.features.zstd = True
    req.features.payload = _rle_frame(_packed(req), [BLOCK] * blocks, rng.randrange(256))
    return req


def _frame_size_lie(rng: random.Random, b: Bases) -> pb.InferRequest:
    # Declares a content size other than the packed size (or none, or a skippable frame).
    req = b.pick(rng, bits=(16, 8))
    n = _packed(req)
    req.features.zstd = True
    req.features.payload = rng.choice(
        [
            _rle_frame(n - 1, [n - 1]),
            _rle_frame(n + 1, [n + 1]),
            _rle_frame(2**32 - 1, [BLOCK]),
            _rle_frame(None, [n]),
            (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"skip",
        ]
    )
    return req


def _frame_holds_less(rng: random.Random, b: Bases) -> pb.InferRequest:
    # Declares the packed size but holds fewer bytes, or a block of the wrong kind.
    req = b.pick(rng, bits=(16, 8))
    n = _packed(req)
    req.features.zstd = True
    frame = _rle_frame(n, [rng.randint(1, n - 1)])
    if rng.random() < 0.5:
        frame = frame[:-1]  # the last block's byte is missing
    req.features.payload = frame
    return req


def _nan_payload(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng, bits=(16,))
    values = np.frombuffer(req.features.payload, dtype="<u2").copy()
    special = rng.choice([0x7C00, 0xFC00, 0x7E00, 0x7C00 | rng.randint(1, 0x3FF)])  # inf, nan
    values[rng.randrange(values.size)] = special | (rng.getrandbits(1) << 15)
    req.features.payload = values.tobytes()
    return req


def _nan_params(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = _quantized(rng, b)
    fmt = "<f4" if req.features.fp32_params else "<f2"
    params = np.frombuffer(req.features.params, dtype=fmt).copy()
    params[rng.randrange(params.size)] = rng.choice([np.nan, np.inf, -np.inf])
    req.features.params = params.tobytes()
    return req


def _negative_step(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = _quantized(rng, b)
    fmt = "<f4" if req.features.fp32_params else "<f2"
    params = np.frombuffer(req.features.params, dtype=fmt).copy()
    params[2 * rng.randrange(params.size // 2) + 1] = -rng.uniform(0.01, 1.0)
    req.features.params = params.tobytes()
    return req


def _params_overflow(rng: random.Random, b: Bases) -> pb.InferRequest:
    # float32 parameters whose reach |offset| + levels * step passes the float32 range.
    req = _quantized(rng, b)
    groups = req.features.shape[0]
    req.features.fp32_params = True
    req.features.params = struct.pack(f"<{2 * groups}f", *([3.0e38, 1.0e38] * groups))
    return req


def _no_features(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    req.ClearField("features")
    return req


def _empty_id(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    req.request_id = ""
    return req


def _long_id(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    req.request_id = rng.choice(["x" * 129, "é" * 129, "y" * 1000, f"{'z' * 125}{rng.random()}"])
    return req


def _unknown_model(rng: random.Random, b: Bases) -> pb.InferRequest:
    # Unknown names that look like the real one: case, whitespace, paths, control chars.
    req = b.pick(rng)
    req.model = rng.choice(["", "Digits", "digits ", "nope", "digits/../digits", "\0", "🙂"])
    return req


def _unknown_version(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    req.version = rng.choice(["nope", "0", b.version[:-1], b.version.upper() + "x"])
    return req


def _unknown_adapter(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    req.adapter = rng.choice(["nope", "lora", "../digits"])
    req.adapter_version = rng.choice(["", "1", "latest"])
    return req


def _adapter_version_alone(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    req.adapter_version = rng.choice(["1", "v2"])
    return req


def _oversized(rng: random.Random, b: Bases) -> pb.InferRequest:
    req = b.pick(rng)
    if rng.random() < 0.2:
        req.request_id = "i" * rng.randint(MAX_BYTES, 2 * MAX_BYTES)
    else:
        req.features.payload = rng.randbytes(rng.randint(MAX_BYTES + 1, 3 * MAX_BYTES))
    return req


def _exactly(size: int) -> Callable[[random.Random, Bases], pb.InferRequest]:
    """A request of exactly ``size`` bytes (a padded payload): the size limit's edge."""

    def build(rng: random.Random, b: Bases) -> pb.InferRequest:
        req = b.pick(rng, bits=(16,))
        req.features.payload = b""
        n = size - req.ByteSize()
        for _ in range(8):  # length prefixes grow with n: converges in two steps
            req.features.payload = bytes(n)
            n += size - req.ByteSize()
        assert req.ByteSize() == size
        return req

    return build


IA, NF = Code.INVALID_ARGUMENT, Code.NOT_FOUND
BAD = "bad features: "
# name -> (code, substring of the details, builder)
KINDS: dict[str, tuple[Code, str, Callable[[random.Random, Bases], pb.InferRequest]]] = {
    "shape: one dimension off": (IA, BAD, _shape_dim_off),
    "shape: reshaped, same elements": (IA, "features have shape", _reshaped),
    "shape: a narrower width's": (IA, "features have shape", _narrower_features),
    "shape: a wider width's": (IA, BAD + "element count exceeds", _wider_features),
    "width: untrained, nan, inf": (IA, "not trained", _untrained_width),
    "dtype: unknown enum": (IA, BAD + "unknown dtype enum", _dtype_enum),
    "codec version": (IA, BAD + "unsupported codec version", _codec_version),
    "bits": (IA, BAD + "unsupported bits", _bits),
    "ndim over 6": (IA, "outside the caps", _too_many_dims),
    "zero dimension": (IA, "outside the caps", _zero_dim),
    "dimension over 2**24": (IA, "outside the caps", _dim_over_cap),
    "gigantic element count": (IA, BAD + "element count exceeds", _gigantic_tensor),
    "params too short": (IA, BAD, _params_short),
    "params too long": (IA, BAD, _params_long),
    "payload too short": (IA, BAD, _payload_short),
    "payload too long": (IA, BAD, _payload_long),
    "fp32 params flag lies": (IA, BAD, _fp32_flag_lie),
    "zstd flag lies (set)": (IA, BAD, _zstd_flag_lie_on),
    "zstd flag lies (unset)": (IA, BAD, _zstd_flag_lie_off),
    "bomb: 1 GiB, size declared": (IA, BAD + "compressed payload is not smaller", _bomb_declared),
    "bomb: 1 GiB, size unknown": (IA, BAD + "compressed payload is not smaller", _bomb_undeclared),
    "bomb: lies its content size": (IA, BAD + "zstd decompression failed", _small_bomb),
    "frame: content size lies": (IA, BAD, _frame_size_lie),
    "frame: holds too little": (IA, BAD + "zstd decompression failed", _frame_holds_less),
    "nan/inf in float16 payload": (IA, BAD + "non-finite value", _nan_payload),
    "nan/inf in params": (IA, BAD + "non-finite quantization parameters", _nan_params),
    "negative step": (IA, BAD + "negative quantization step", _negative_step),
    "params overflow float32": (
        IA,
        BAD + "quantization parameters overflow float32",
        _params_overflow,
    ),
    "features missing": (IA, "features are missing", _no_features),
    "request_id empty": (IA, "request_id needs", _empty_id),
    "request_id too long": (IA, "request_id needs", _long_id),
    "adapter_version alone": (IA, "adapter_version without adapter", _adapter_version_alone),
    "unknown model": (NF, "unknown model", _unknown_model),
    "unknown version": (NF, "has no version", _unknown_version),
    "unknown adapter": (NF, "has no adapter", _unknown_adapter),
    "oversized message": (Code.RESOURCE_EXHAUSTED, "larger than max", _oversized),
    "exactly the size limit": (IA, BAD, _exactly(MAX_BYTES)),
    "one byte over the limit": (
        Code.RESOURCE_EXHAUSTED,
        "larger than max",
        _exactly(MAX_BYTES + 1),
    ),
}
ROUNDS = 22  # 38 kinds x 22 = 836 built cases


def _built_cases(rng: random.Random, b: Bases) -> list[Case]:
    cases = []
    for _ in range(ROUNDS):
        for kind, (code, detail, build) in KINDS.items():
            data = build(rng, b).SerializeToString()
            # The labels and the oracle must agree, or one of them is wrong.
            assert _oracle(data, b) == {code}, (kind, _oracle(data, b))
            cases.append(Case(kind, data, frozenset({code}), detail))
    return cases


def _flip_bits(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _raw_cases(rng: random.Random, b: Bases) -> list[Case]:
    """Bytes that never went through a builder; the oracle says what each must get."""
    made: list[tuple[str, bytes]] = []
    for _ in range(150):
        made.append(("raw: random garbage", rng.randbytes(rng.randint(1, 512))))
    for _ in range(10):
        made.append(("raw: oversized garbage", rng.randbytes(rng.randint(MAX_BYTES + 1, 2**17))))
    for _ in range(120):
        whole = b.pick(rng).SerializeToString()
        made.append(("raw: truncated", whole[: rng.randrange(1, len(whole))]))
    for _ in range(250):
        made.append(("raw: bit flips", _flip_bits(b.pick(rng).SerializeToString(), rng)))
    return [
        Case(kind, data, allowed, "" if len(data) > MAX_BYTES or _parses(data) else UNPARSEABLE)
        for kind, data in made
        for allowed in [_oracle(data, b)]
    ]


def _valid_cases(rng: random.Random, b: Bases, n: int) -> list[Case]:
    out = []
    for _ in range(n):
        req = b.pick(rng)
        out.append(Case("valid", req.SerializeToString(), frozenset({Code.OK}), "", b.label(req)))
    return out


# ------------------------------------------------------------------------- calls and memory


async def _call(method: grpc.aio.UnaryUnaryMultiCallable, data: bytes) -> Outcome:
    try:
        response = await method(data, timeout=60)
    except grpc.aio.AioRpcError as exc:
        return Outcome(exc.code(), exc.details() or "", None)
    return Outcome(Code.OK, "", response)


def _proc_kib(field: str) -> int | None:
    """A ``/proc/self/status`` figure in KiB (VmRSS, VmHWM), or None where there is none."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


def _reset_peak() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0); False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def test_x() -> np.ndarray:
    return load_data("digits").test.x[:8]


@pytest.fixture()
def repo(tmp_path: Path, digits_bundle: Path) -> Path:
    return make_repo(tmp_path, digits_bundle)


# ------------------------------------------------------------------------- the flood


def test_hand_made_zstd_frames_are_genuine() -> None:
    """The bombs fail below for what they claim and hold, not for being broken frames."""
    dctx = zstandard.ZstdDecompressor()
    assert dctx.decompress(_rle_frame(100, [60, 40], 7)) == bytes([7]) * 100
    expanded = dctx.decompressobj().decompress(_rle_frame(None, [BLOCK] * 8))
    assert len(expanded) == 8 * BLOCK and not any(expanded)
    declared = _zeros_frame(BOMB_BYTES, declare=True)
    assert zstandard.frame_content_size(declared) == BOMB_BYTES
    assert zstandard.frame_content_size(_zeros_frame(1 << 20, declare=False)) == -1
    assert len(declared) < MAX_BYTES - 1024  # fits a message: the codec, not gRPC, refuses it
    with dctx.stream_reader(io.BytesIO(declared)) as reader:
        assert reader.read(1 << 20) == bytes(1 << 20)


def test_a_flood_of_malformed_requests_hurts_nothing(
    repo: Path, digits_bundle: Path, test_x: np.ndarray
) -> None:
    rng = random.Random(SEED)
    b = Bases(digits_bundle, test_x)
    malformed = _built_cases(rng, b) + _raw_cases(rng, b)
    # Some bit flips only change feature values and still make valid requests: not counted.
    assert sum(Code.OK not in c.allowed for c in malformed) >= 1_000
    # Valid requests ride along, so some batches mix them with bombs and NaN payloads.
    cases = malformed + _valid_cases(rng, b, 48)
    rng.shuffle(cases)
    after = b.pick(rng, widths=[0.75], bits=(4,))
    after_label = b.label(after)

    async def main() -> tuple[list[Outcome], Outcome, int, str, dict[str, int | None]]:
        async with (
            running(config(repo, max_message_bytes=MAX_BYTES)) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            raw = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
            warm = await _call(raw, b.pick(rng).SerializeToString())
            assert warm.code == Code.OK, warm
            mem: dict[str, int | None] = {"before": _proc_kib("VmRSS")}
            peak_reset = _reset_peak()

            slots = asyncio.Semaphore(IN_FLIGHT)

            async def one(case: Case) -> Outcome:
                async with slots:
                    return await _call(raw, case.data)

            outcomes = await asyncio.gather(*(one(c) for c in cases))
            mem["after"] = _proc_kib("VmRSS")
            mem["peak"] = _proc_kib("VmHWM") if peak_reset else None
            last = await _call(raw, after.SerializeToString())
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="tandem.v1.SplitInference"), timeout=30
            )
            return list(outcomes), last, health.status, server.metrics.text(), mem

    outcomes, last, health, metrics, mem = asyncio.run(main())

    wrong = [
        (c.kind, o.code, o.details[:120])
        for c, o in zip(cases, outcomes, strict=True)
        if o.code not in c.allowed or c.detail not in o.details
    ]
    assert not wrong, sorted({w[0]: w for w in wrong}.values())
    mislabelled = [
        c.kind
        for c, o in zip(cases, outcomes, strict=True)
        if c.label is not None
        and (o.response is None or pb.InferResponse.FromString(o.response).top[0].index != c.label)
    ]
    assert not mislabelled

    counts = Counter(o.code.name for c, o in zip(cases, outcomes, strict=True) if c.label is None)
    print(f"\n{len(malformed)} malformed or mutated requests: {dict(counts)}; KiB: {mem}")
    # Nothing crashed: never INTERNAL or UNKNOWN.
    assert counts["INTERNAL"] == 0
    assert counts["UNKNOWN"] == 0
    # Every failure the service saw, it counted under the code it answered.
    errors: Counter[str] = Counter()
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "tandem_errors_total":
                errors[sample.labels["code"]] += int(sample.value)
    for code in ("INVALID_ARGUMENT", "NOT_FOUND"):
        assert errors[code] == counts[code], code

    assert last.code == Code.OK and last.response is not None
    assert pb.InferResponse.FromString(last.response).top[0].index == after_label
    assert health == health_pb2.HealthCheckResponse.SERVING

    # A naive decode of a single 1 GiB bomb would break these bounds by itself.
    if mem["before"] is not None and mem["after"] is not None:
        assert mem["after"] - mem["before"] < RSS_BOUND_KIB, mem
    if mem["before"] is not None and mem["peak"] is not None:
        assert mem["peak"] - mem["before"] < RSS_BOUND_KIB, mem


# ------------------------------------------------------------------------- known defects


def _one(repo: Path, request: pb.InferRequest, **overrides: object) -> Outcome:
    async def main() -> Outcome:
        async with (
            running(config(repo, **overrides)) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            raw = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
            return await _call(raw, request.SerializeToString())

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        pytest.param("model", "m" * 20_000, NF, id="model"),
        pytest.param("version", "v" * 20_000, NF, id="version"),
        pytest.param("adapter", "a" * 20_000, NF, id="adapter"),
        pytest.param("shape", [1] * 10_000, IA, id="shape"),
    ],
)
def test_long_client_strings_still_get_their_code(
    repo: Path, digits_bundle: Path, test_x: np.ndarray, field: str, value: object, code: Code
) -> None:
    request = requests_for(digits_bundle, test_x[:1], 0.5, 4)[0]
    if field == "shape":
        request.features.shape[:] = value  # type: ignore[assignment]
    else:
        setattr(request, field, value)
    assert request.ByteSize() < 1 << 20  # well within the default message limit
    outcome = _one(repo, request)
    assert outcome.code == code, outcome


def test_unknown_model_names_leave_the_metrics_bounded(
    repo: Path, digits_bundle: Path, test_x: np.ndarray
) -> None:
    base = requests_for(digits_bundle, test_x[:1], 0.5, 4)[0]

    async def main() -> tuple[list[Code], int, int]:
        async with (
            running(config(repo)) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            raw = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
            before = len(server.metrics.text())
            codes = []
            for i in range(100):
                request = pb.InferRequest()
                request.CopyFrom(base)
                request.request_id, request.model = f"n{i}", f"{i:04d}" + "x" * 1_000
                codes.append((await _call(raw, request.SerializeToString())).code)
            return codes, before, len(server.metrics.text())

    codes, before, after = asyncio.run(main())
    assert codes == [NF] * 100
    # 100 names of 1 KB each: bounded metrics grow by a few counters at most, not by ~200 KB.
    assert after - before < 16_384, (before, after)


def test_features_that_overflow_the_tail_get_no_nan_answer(
    repo: Path, digits_bundle: Path, test_x: np.ndarray
) -> None:
    request = requests_for(digits_bundle, test_x[:1], 0.5, 8)[0]
    groups = request.features.shape[0]
    request.features.fp32_params = True
    request.features.params = struct.pack(f"<{2 * groups}f", *([3.0e38, 0.0] * groups))
    request.return_logits = True
    outcome = _one(repo, request)
    if outcome.code == Code.OK:
        assert outcome.response is not None
        response = pb.InferResponse.FromString(outcome.response)
        values = [*response.logits, *(c.score for c in response.top)]
        assert all(math.isfinite(v) for v in values), response
    else:
        assert outcome.code == IA, outcome
