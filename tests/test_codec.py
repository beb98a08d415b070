"""Tests for tandem.codec: round trips, error bounds, header layout and hostile input."""

from __future__ import annotations

import functools
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem import codec
from tandem.codec import CodecError, decode, encode, read_header

SHAPES = [(), (1,), (100,), (7, 9), (3, 5, 7), (2, 3, 4, 5), (2, 1, 3, 1, 2, 3)]
QBITS = (2, 4, 8)
U32 = 2.0**-24  # unit roundoff of float32


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _groups_view(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    groups = int(np.prod(shape[:-2])) if len(shape) >= 2 else 1
    return np.asarray(a, dtype=np.float64).reshape(groups, -1)


def _assert_within_bound(x: np.ndarray, data: bytes) -> None:
    """Every element is within step/2 (+ float32 rounding) of the original."""
    h = read_header(data)
    y = decode(data)
    assert y.shape == x.shape
    step = codec.quantization_step(h)
    assert step is not None and h.offset is not None
    levels = (1 << h.bits) - 1
    s = step.astype(np.float64)[:, None]
    o = h.offset.astype(np.float64)[:, None]
    xg = _groups_view(x, x.shape)
    yg = _groups_view(y, x.shape)
    eps = 16 * U32 * (np.abs(o) + levels * s + np.abs(xg))
    err = np.abs(yg - xg)
    assert (err <= s / 2 + eps).all(), float((err - s / 2).max())
    # The step is never needlessly coarse: at most a little above the ideal one (the grid
    # widens the range by up to 2**-5, and float16 parameters cost up to 2**-6 on top).
    ideal = (xg.max(axis=1) - xg.min(axis=1)) / levels
    assert (step <= ideal * (1 + 2**-5) * (1 + 2**-6) + 1e-30).all()


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _message(
    *,
    shape: tuple[int, ...],
    bits_code: int = 2,
    dtype_code: int = 0,
    flags: int = 0,
    version: int = 1,
    params: bytes = b"",
    payload: bytes = b"",
    payload_len: int | None = None,
    ndim: int | None = None,
) -> bytes:
    """Hand-build a message following the documented layout."""
    nd = len(shape) if ndim is None else ndim
    head = bytes([0xEC, (version << 4) | flags, (bits_code << 6) | (dtype_code << 4) | nd])
    body = b"".join(_varint(d) for d in shape)
    plen = len(payload) if payload_len is None else payload_len
    return head + body + _varint(plen) + params + payload


def _peak_bytes(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(CodecError):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("bits", QBITS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("compress", [True, False])
def test_round_trip_quantized(bits: int, shape: tuple[int, ...], compress: bool) -> None:
    x = (_rng(bits).normal(size=shape) * 3 + 1).astype(np.float32)
    data = encode(x, bits, compress=compress)
    y = decode(data)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert y.flags.writeable
    _assert_within_bound(x, data)


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_fp16_passthrough(shape: tuple[int, ...]) -> None:
    x = _rng(16).normal(size=shape).astype(np.float32) * 100
    data = encode(x, 16)
    y = decode(data)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
    h = read_header(data)
    assert h.bits == 16 and h.scale is None and h.offset is None and h.param_precision is None
    assert codec.quantization_step(h) is None


def test_groups_are_planes_of_last_two_axes() -> None:
    x = np.zeros((2, 3, 4, 5), dtype=np.float32)
    x += np.arange(6, dtype=np.float32).reshape(2, 3, 1, 1) * 10
    x[..., 0, 0] += 1.0
    h = read_header(encode(x, 8))
    assert h.groups == 6
    assert h.offset is not None and h.scale is not None
    # Each group's own range, [10 k, 10 k + 1], widened by at most the grid (1/64 of it).
    assert h.offset[0] == 0
    np.testing.assert_allclose(h.offset, np.arange(6) * 10, rtol=0, atol=2**-6)
    np.testing.assert_allclose(h.scale, 1 / 255, rtol=2**-5 + 2**-6)
    assert read_header(encode(np.ones((4, 5), np.float32), 8)).groups == 1
    assert read_header(encode(np.ones(9, np.float32), 8)).groups == 1
    assert read_header(encode(np.float32(2.5), 8)).groups == 1


@settings(max_examples=150, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
        elements=st.floats(-1e4, 1e4, width=32),
    ),
    bits=st.sampled_from(QBITS),
    compress=st.booleans(),
)
def test_property_error_bound(x: np.ndarray, bits: int, compress: bool) -> None:
    data = encode(x, bits, compress=compress)
    _assert_within_bound(x, data)
    assert decode(data).shape == x.shape


@settings(max_examples=100, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=5),
        elements=st.floats(-(2.0**100), 2.0**100, width=32),
    ),
    bits=st.sampled_from(QBITS),
)
def test_property_error_bound_wide_range(x: np.ndarray, bits: int) -> None:
    _assert_within_bound(x, encode(x, bits))


@settings(max_examples=100, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=6),
        elements=st.floats(-6e4, 6e4, width=32),
    )
)
def test_property_fp16_passthrough(x: np.ndarray) -> None:
    y = decode(encode(x, 16))
    np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))


def test_worst_case_rounding_points() -> None:
    # Values exactly half-way between quantization levels, many of them.
    rng = _rng(3)
    for bits in QBITS:
        levels = (1 << bits) - 1
        k = rng.integers(0, levels, size=(4, 64, 64))
        x = ((k + 0.5) / levels * 7.3 - 2.1).astype(np.float32)
        x[:, 0, 0] = -2.1
        x[:, 0, 1] = 5.2
        _assert_within_bound(x, encode(x, bits))


def test_packed_layout_is_low_bits_first() -> None:
    x = np.arange(16, dtype=np.float32)
    data = encode(x, 4, compress=False)
    h = read_header(data)
    assert h.offset is not None and h.scale is not None
    # A zero minimum stays the offset; the step is 1 widened by the stability grid.
    assert float(h.offset[0]) == 0.0 and 1.0 <= float(h.scale[0]) <= 1.0 + 2**-6
    payload = data[h.header_size :]
    assert payload == bytes([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE])
    x2 = np.array([0, 1, 2, 3, 3], dtype=np.float32)
    data2 = encode(x2, 2, compress=False)
    h2 = read_header(data2)
    assert data2[h2.header_size :] == bytes([0b11100100, 0b00000011])
    _assert_within_bound(x2, data2)


@pytest.mark.parametrize("bits", QBITS)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 9, 1001])
def test_padding_lengths(bits: int, n: int) -> None:
    x = _rng(n).uniform(-1, 1, size=n).astype(np.float32)
    data = encode(x, bits, compress=False)
    h = read_header(data)
    assert h.payload_size == (n * bits + 7) // 8
    _assert_within_bound(x, data)


# ----------------------------------------------------------------------------- constants, dtypes


@pytest.mark.parametrize("bits", QBITS)
@pytest.mark.parametrize("value", [0.0, 0.5, -3.25, 1024.0, 1 / 3, 1e-9, 123456.7])
def test_constant_tensor_decodes_exactly(bits: int, value: float) -> None:
    x = np.full((3, 4, 5), value, dtype=np.float32)
    data = encode(x, bits)
    np.testing.assert_array_equal(decode(data), x)
    h = read_header(data)
    assert h.scale is not None and (h.scale == 0).all()
    exact16 = abs(value) < 65504 and float(np.float16(value)) == float(np.float32(value))
    assert h.param_precision == ("float16" if exact16 else "float32")


def test_mixed_constant_and_varying_groups() -> None:
    x = _rng(5).normal(size=(4, 6, 6)).astype(np.float32)
    x[1] = 0.0
    x[3] = 2.0
    data = encode(x, 4)
    y = decode(data)
    np.testing.assert_array_equal(y[1], 0.0)
    np.testing.assert_array_equal(y[3], 2.0)
    _assert_within_bound(x, data)


def test_fp32_params_when_fp16_too_coarse() -> None:
    # Large offset with a small range: fp16 offset rounding would waste precision.
    x = (1e6 + _rng(6).uniform(0, 1, size=(2, 8, 8))).astype(np.float32)
    data = encode(x, 8)
    h = read_header(data)
    assert h.param_precision == "float32"
    _assert_within_bound(x, data)
    # Ordinary activations use fp16 parameters.
    z = _rng(6).normal(size=(2, 8, 8)).astype(np.float32)
    assert read_header(encode(z, 8)).param_precision == "float16"
    # Tiny steps underflow float16: fp32 params.
    t = (_rng(6).uniform(0, 1e-7, size=(2, 8, 8))).astype(np.float32)
    data_t = encode(t, 8)
    assert read_header(data_t).param_precision == "float32"
    _assert_within_bound(t, data_t)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bits", [*QBITS, 16])
def test_dtype_restored(dtype: Any, bits: int) -> None:
    x = _rng(7).normal(size=(2, 3, 4)).astype(dtype)
    data = encode(x, bits)
    y = decode(data)
    assert y.dtype == np.dtype(dtype)
    assert read_header(data).dtype == np.dtype(dtype)
    if bits == 16:
        np.testing.assert_array_equal(y, x.astype(np.float16).astype(dtype))
    else:
        _assert_within_bound(x.astype(np.float32), data)


def test_float16_output_never_overflows() -> None:
    x = np.array([[[-65504.0, 65504.0, 0.0, 1.0]]], dtype=np.float16)
    for bits in QBITS:
        y = decode(encode(x, bits))
        assert y.dtype == np.float16 and np.isfinite(y).all()


def test_non_native_byte_order_and_strided_input() -> None:
    x = _rng(8).normal(size=(3, 8, 8)).astype(">f4")
    y = decode(encode(x, 8))
    assert y.dtype == np.float32
    _assert_within_bound(x.astype(np.float32), encode(x, 8))
    strided = _rng(8).normal(size=(6, 8, 16)).astype(np.float32)[::2, :, ::2]
    _assert_within_bound(strided, encode(strided, 4))


def test_torch_tensor_input() -> None:
    torch = pytest.importorskip("torch")
    t = torch.linspace(-2, 3, 2 * 3 * 4 * 5, requires_grad=True).reshape(2, 3, 4, 5)
    data = encode(t, 8)
    _assert_within_bound(t.detach().numpy(), data)
    assert decode(encode(t.to(torch.float16), 16)).dtype == np.float16
    bf = decode(encode(t.to(torch.bfloat16), 8))
    assert bf.dtype == np.float32 and bf.shape == (2, 3, 4, 5)
    with pytest.raises(CodecError):
        encode(torch.arange(10), 8)


def test_decode_returns_fresh_writable_array() -> None:
    x = _rng(9).normal(size=(2, 4, 4)).astype(np.float32)
    for bits in (*QBITS, 16):
        buf = bytearray(encode(x, bits, compress=False))
        y = decode(buf)
        assert y.flags.writeable
        before = y.copy()
        buf[-1] ^= 0xFF
        np.testing.assert_array_equal(y, before)
        y += 1  # must not raise


def test_accepts_bytes_like_inputs() -> None:
    x = _rng(10).normal(size=(2, 5, 5)).astype(np.float32)
    data = encode(x, 4)
    ref = decode(data)
    np.testing.assert_array_equal(decode(bytearray(data)), ref)
    np.testing.assert_array_equal(decode(memoryview(data)), ref)
    padded = b"??" + data + b"!!"
    np.testing.assert_array_equal(decode(memoryview(padded)[2:-2]), ref)
    # A multi-byte-format view is read as its raw bytes.
    aligned = data + b"\0" * (-len(data) % 4)
    words = np.frombuffer(aligned, dtype=np.uint32)
    if len(aligned) == len(data):
        np.testing.assert_array_equal(decode(words.data), ref)
    else:
        with pytest.raises(CodecError, match="trailing"):
            decode(words.data)
    np.testing.assert_array_equal(decode(np.frombuffer(data, np.uint8).data), ref)
    with pytest.raises(CodecError):
        decode(np.frombuffer(padded, np.uint8)[::2].data)  # non-contiguous
    with pytest.raises(CodecError):
        decode("not bytes")  # type: ignore[arg-type]


def test_encoding_is_deterministic() -> None:
    x = _rng(11).normal(size=(4, 6, 6)).astype(np.float32)
    for bits in (*QBITS, 16):
        assert encode(x, bits) == encode(x.copy(), bits)


# ----------------------------------------------------------------------------- compression


def test_compress_used_only_when_smaller() -> None:
    zeros = np.zeros((8, 32, 32), dtype=np.float32)
    zeros[:, 0, 0] = 1.0
    packed = encode(zeros, 8, compress=False)
    squeezed = encode(zeros, 8, compress=True)
    assert read_header(squeezed).compressed and not read_header(packed).compressed
    assert len(squeezed) < len(packed) / 10
    np.testing.assert_array_equal(decode(squeezed), decode(packed))

    noise = _rng(12).uniform(-1, 1, size=(8, 32, 32)).astype(np.float32)
    a = encode(noise, 8, compress=True)
    b = encode(noise, 8, compress=False)
    assert not read_header(a).compressed
    assert a == b

    tiny = np.zeros(4, dtype=np.float32)
    assert not read_header(encode(tiny, 8)).compressed


def test_compress_false_is_honoured() -> None:
    x = np.zeros((4, 16, 16), dtype=np.float32)
    for bits in (*QBITS, 16):
        h = read_header(encode(x, bits, compress=False))
        assert not h.compressed
        assert h.payload_size == h.packed_size


def test_compression_level_round_trips() -> None:
    x = np.maximum(_rng(13).normal(size=(4, 12, 12)), 0).astype(np.float32)
    for level in (1, 3, 19):
        data = encode(x, 4, level=level)
        assert read_header(data).compressed
        _assert_within_bound(x, data)


# ----------------------------------------------------------------------------- header size


def test_header_is_small() -> None:
    x = _rng(14).normal(size=(2, 7, 7)).astype(np.float32)
    data = encode(x, 4, compress=False)
    h = read_header(data)
    assert h.header_size <= 16
    assert h.header_size == 15  # 3 fixed + 3 dims + 1 length + 2 groups x 2 x fp16
    assert h.payload_size == 49 and len(data) == h.total_size == 64
    one = encode(np.ones(3, np.float32) * np.arange(3, dtype=np.float32), 8)
    assert read_header(one).header_size == 3 + 1 + 1 + 4
    assert read_header(encode(np.ones(3, np.float32), 16)).header_size == 5


def test_read_header_fields() -> None:
    x = _rng(15).normal(size=(3, 4, 5)).astype(np.float16)
    data = encode(x, 2)
    h = read_header(data)
    assert h.version == codec.VERSION == 1
    assert (h.bits, h.shape, h.dtype, h.groups, h.n_elements) == (2, (3, 4, 5), np.float16, 3, 60)
    assert h.packed_size == 15
    assert h.scale is not None and h.scale.shape == (3,) and h.scale.dtype == np.float32
    with pytest.raises(ValueError):
        h.scale[0] = 1.0  # read-only


# ----------------------------------------------------------------------------- encode errors


@pytest.mark.parametrize("bits", [0, 1, 3, 5, 12, 32, True, 8.0, "8"])
def test_encode_rejects_bits(bits: Any) -> None:
    with pytest.raises(CodecError):
        encode(np.ones(4, np.float32), bits)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("bits", [*QBITS, 16])
def test_encode_rejects_non_finite(bad: float, bits: int) -> None:
    x = np.ones((2, 3, 3), np.float32)
    x[1, 2, 1] = bad
    with pytest.raises(CodecError):
        encode(x, bits)
    with pytest.raises(CodecError):
        encode(x.astype(np.float64), bits)


@pytest.mark.parametrize(
    "x",
    [
        np.arange(4, dtype=np.int32),
        np.arange(4, dtype=np.uint8),
        np.ones(4, dtype=bool),
        np.ones(4, dtype=np.complex64),
        np.array(["a", "b"]),
        np.array([1.0, None], dtype=object),
    ],
)
def test_encode_rejects_non_float(x: np.ndarray) -> None:
    with pytest.raises(CodecError):
        encode(x, 8)


def test_encode_rejects_shapes_and_ranges() -> None:
    with pytest.raises(CodecError):
        encode(np.zeros((0, 3), np.float32), 8)
    with pytest.raises(CodecError):
        encode(np.zeros((1,) * 7, np.float32), 8)
    big = np.broadcast_to(np.float32(0), (codec.MAX_ELEMENTS + 1,))
    with pytest.raises(CodecError):
        encode(big, 8)
    with pytest.raises(CodecError):
        encode(np.array([1e5, 0], np.float32), 16)  # beyond float16
    with pytest.raises(CodecError):
        encode(np.array([1e300, 0.0]), 8)  # beyond float32
    with pytest.raises(CodecError):
        encode(np.array([-3e38, 3e38], np.float32), 8)  # range overflows float32
    assert decode(encode(np.array([-1e38, 1e38], np.float32), 8)).dtype == np.float32


@pytest.mark.parametrize("level", [23, 100, -(1 << 20), 3.0, None, True])
def test_encode_rejects_bad_level(level: Any) -> None:
    with pytest.raises(CodecError, match="level"):
        encode(np.zeros(100, np.float32), 8, level=level)


def test_subnormal_ranges() -> None:
    x = np.array([0.0, 1e-44, 3e-45, 6e-45, 2e-38, 1e-39], np.float32).reshape(2, 1, 3)
    for bits in QBITS:
        data = encode(x, bits)
        assert read_header(data).param_precision == "float32"
        _assert_within_bound(x, data)


def test_unexpected_exceptions_become_codec_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(np.ones((2, 3, 3), np.float32), 8)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise IndexError("simulated bug")

    monkeypatch.setattr(codec, "_unpack", boom)
    with pytest.raises(CodecError, match=codec.INTERNAL_ERROR_PREFIX):
        decode(data)

    def oom(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr(codec, "_unpack", oom)
    with pytest.raises(CodecError, match="out of memory"):
        decode(data)


# ----------------------------------------------------------------------------- hostile input


def _valid_messages() -> list[bytes]:
    rng = _rng(20)
    x = rng.normal(size=(2, 3, 5)).astype(np.float32)
    relu = np.maximum(rng.normal(size=(3, 16, 16)), 0).astype(np.float32)
    msgs = [encode(x, b, compress=False) for b in (*QBITS, 16)]
    msgs += [encode(relu, b) for b in (*QBITS, 16)]
    msgs.append(encode((1e6 + x).astype(np.float32), 8))  # fp32 params
    assert any(read_header(m).compressed for m in msgs)
    assert any(read_header(m).param_precision == "float32" for m in msgs)
    return msgs


def test_truncation_at_every_offset() -> None:
    for msg in _valid_messages():
        decode(msg)
        for cut in range(len(msg)):
            with pytest.raises(CodecError):
                decode(msg[:cut])
            with pytest.raises(CodecError):
                read_header(msg[:cut])


def test_trailing_garbage() -> None:
    for msg in _valid_messages():
        for junk in (b"\0", b"xyz", msg):
            with pytest.raises(CodecError, match="trailing"):
                decode(msg + junk)


def test_wrong_magic_and_version_and_flags() -> None:
    msg = encode(np.arange(8, dtype=np.float32), 8, compress=False)
    for magic in (0x00, 0xED, 0xFF, ord("T")):
        with pytest.raises(CodecError, match="magic"):
            decode(bytes([magic]) + msg[1:])
    for version in (0, 2, 3, 15):
        with pytest.raises(CodecError, match="version"):
            decode(msg[:1] + bytes([(version << 4) | (msg[1] & 0xF)]) + msg[2:])
    for flag in (0x4, 0x8):
        with pytest.raises(CodecError, match="reserved"):
            decode(msg[:1] + bytes([msg[1] | flag]) + msg[2:])
    dtype3 = msg[:2] + bytes([(msg[2] & 0xCF) | 0x30]) + msg[3:]
    with pytest.raises(CodecError, match="dtype"):
        decode(dtype3)
    with pytest.raises(CodecError):
        decode(b"")


def test_fp32_flag_on_passthrough_rejected() -> None:
    msg = _message(shape=(2,), bits_code=3, flags=0x2, payload=b"\0" * 4)
    with pytest.raises(CodecError):
        decode(msg)
    ok = _message(shape=(2,), bits_code=3, payload=b"\0" * 4)
    np.testing.assert_array_equal(decode(ok), [0.0, 0.0])


def test_bad_ndim_and_dims() -> None:
    params = struct.pack("<2e", 0.0, 1.0)
    for nd in range(7, 16):
        with pytest.raises(CodecError, match="ndim"):
            decode(_message(shape=(1,) * nd, params=params, payload=b"\0"))
    with pytest.raises(CodecError, match="dimension"):
        decode(_message(shape=(0,), params=params, payload=b""))
    with pytest.raises(CodecError, match="dimension"):
        decode(_message(shape=(codec.MAX_DIM + 1,), params=params, payload=b"\0"))
    # ndim 0 (a scalar) is legal.
    scalar = _message(shape=(), params=struct.pack("<2e", 1.5, 0.0), payload=b"\0")
    y = decode(scalar)
    assert y.shape == () and float(y) == 1.5


def test_varints_bounded_and_canonical() -> None:
    params = struct.pack("<2e", 0.0, 1.0)
    good = _message(shape=(3,), params=params, payload=b"\0\1\2")
    np.testing.assert_array_equal(decode(good), [0, 1, 2])
    head = good[:3]
    tail = b"\x03" + params + b"\0\1\2"
    with pytest.raises(CodecError, match="overlong"):
        decode(head + b"\x83\x00" + tail)  # dim 3 written in two bytes
    with pytest.raises(CodecError, match="longer"):
        decode(head + b"\xff" * 6 + b"\x01" + tail)
    with pytest.raises(CodecError, match="overlong"):
        decode(head + b"\x03" + b"\x83\x00" + params + b"\0\1\2")  # payload length
    with pytest.raises(CodecError):
        decode(head + b"\x80\x80\x80\x80\x80")  # runs off the end


def test_lying_dims_allocate_nothing() -> None:
    params = struct.pack("<2e", 0.0, 1.0)
    claims = [
        _message(shape=(4096, 4096), params=params, payload=b"\0" * 10, payload_len=4096 * 4096),
        _message(shape=(4096, 4096), params=params, payload=b"\0" * 10),
        _message(shape=(1 << 20, 16, 1), params=params, payload=b"\0" * 10),
        _message(shape=(4096, 4096), bits_code=3, payload=b"\0" * 10),
        _message(shape=(4096, 4096), flags=1, params=params, payload=b"\x28\xb5\x2f\xfd"),
        _message(shape=(1 << 24, 1 << 24), params=params, payload=b"\0"),
    ]
    for msg in claims:
        assert len(msg) < 64
        assert _peak_bytes(functools.partial(decode, msg)) < 1_000_000
        assert _peak_bytes(functools.partial(read_header, msg)) < 1_000_000


def test_max_elements_cap() -> None:
    x = _rng(21).normal(size=(4, 5, 5)).astype(np.float32)
    data = encode(x, 8)
    assert decode(data, max_elements=100).shape == (4, 5, 5)
    with pytest.raises(CodecError, match="cap"):
        decode(data, max_elements=99)
    with pytest.raises(CodecError, match="cap"):
        read_header(data, max_elements=50)


def test_payload_length_mismatch() -> None:
    x = np.arange(10, dtype=np.float32)
    good = encode(x, 8, compress=False)
    h = read_header(good)
    params, payload = good[h.header_size - 4 : h.header_size], good[h.header_size :]
    assert decode(_message(shape=(10,), params=params, payload=payload)).shape == (10,)
    for claimed in (0, 9, 11, 100):
        with pytest.raises(CodecError):
            decode(_message(shape=(10,), params=params, payload=payload, payload_len=claimed))
    # Consistent length field, but not the packed size the shape implies.
    for actual in (payload[:9], payload + b"\0"):
        with pytest.raises(CodecError, match="expected"):
            decode(_message(shape=(10,), params=params, payload=actual))


def test_bad_params_rejected() -> None:
    payload = b"\0\1\2"
    for off, step in [(np.inf, 1.0), (0.0, np.nan), (np.nan, 0.0), (0.0, -1.0), (0.0, np.inf)]:
        msg = _message(shape=(3,), params=struct.pack("<2e", off, step), payload=payload)
        with pytest.raises(CodecError, match=r"param|step"):
            decode(msg)
    huge = struct.pack("<2f", 3e38, 1e37)
    with pytest.raises(CodecError, match="overflow"):
        decode(_message(shape=(3,), flags=2, params=huge, payload=payload))


def test_non_finite_fp16_payload_rejected() -> None:
    payload = struct.pack("<3e", 1.0, np.inf, 0.0)
    with pytest.raises(CodecError, match="non-finite"):
        decode(_message(shape=(3,), bits_code=3, payload=payload))
    nan = np.array([np.nan], dtype="<f2").tobytes()
    with pytest.raises(CodecError, match="non-finite"):
        decode(_message(shape=(1,), bits_code=3, payload=nan))


def test_nonzero_padding_bits_rejected() -> None:
    params = struct.pack("<2e", 0.0, 1.0)
    ok = _message(shape=(3,), bits_code=1, params=params, payload=b"\x21\x03")
    np.testing.assert_array_equal(decode(ok), [1, 2, 3])
    with pytest.raises(CodecError, match="padding"):
        decode(_message(shape=(3,), bits_code=1, params=params, payload=b"\x21\x13"))
    with pytest.raises(CodecError, match="padding"):
        decode(_message(shape=(3,), bits_code=0, params=params, payload=b"\x40"))


def _zstd(data: bytes, *, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_content_size=content_size).compress(data)


def test_zstd_frame_with_wrong_or_unknown_content_size() -> None:
    params = struct.pack("<2e", 0.0, 1.0)
    packed = bytes(4096)
    good = _message(shape=(4096,), flags=1, params=params, payload=_zstd(packed))
    assert (decode(good) == 0).all()
    with pytest.raises(CodecError, match="content size"):
        decode(_message(shape=(4096,), flags=1, params=params, payload=_zstd(bytes(4095))))
    with pytest.raises(CodecError, match="content size"):
        decode(
            _message(
                shape=(4096,), flags=1, params=params, payload=_zstd(packed, content_size=False)
            )
        )
    with pytest.raises(CodecError, match="zstd"):
        decode(_message(shape=(4096,), flags=1, params=params, payload=b"not a zstd frame"))
    # A compressed payload no smaller than the packed one is never produced: rejected.
    with pytest.raises(CodecError, match="not smaller"):
        decode(_message(shape=(8,), flags=1, params=params, payload=_zstd(bytes(8))))
    # Two frames, or a frame followed by junk.
    two = _zstd(bytes(2048)) + _zstd(bytes(2048))
    with pytest.raises(CodecError):
        decode(_message(shape=(4096,), flags=1, params=params, payload=two))
    with pytest.raises(CodecError):
        decode(_message(shape=(4096,), flags=1, params=params, payload=_zstd(packed) + b"\0"))
    # Corrupted block data after a valid frame header.
    frame = bytearray(_zstd(bytes(range(256)) * 16))
    frame[-3] ^= 0xFF
    with pytest.raises(CodecError):
        decode(_message(shape=(4096,), flags=1, params=params, payload=bytes(frame)))


def _forge_content_size(frame: bytes, size: int) -> bytes:
    """Overwrite the 4-byte Frame_Content_Size field of a zstd frame."""
    descriptor = frame[4]
    assert descriptor >> 6 == 2, "expected a 4-byte content size field"
    single_segment = (descriptor >> 5) & 1
    dict_id_len = (0, 1, 2, 4)[descriptor & 3]
    pos = 5 + (0 if single_segment else 1) + dict_id_len
    return frame[:pos] + struct.pack("<I", size) + frame[pos + 4 :]


def test_decompression_bomb() -> None:
    bomb = _zstd(bytes(20_000_000))
    assert len(bomb) < 4096
    params = struct.pack("<2e", 0.0, 1.0)
    honest = _message(shape=(4096,), flags=1, params=params, payload=bomb)
    forged_frame = _forge_content_size(bomb, 4096)
    assert zstandard.frame_content_size(forged_frame) == 4096
    forged = _message(shape=(4096,), flags=1, params=params, payload=forged_frame)
    unknown = _message(
        shape=(4096,), flags=1, params=params, payload=_zstd(bytes(20_000_000), content_size=False)
    )
    for msg in (honest, forged, unknown):
        peak = _peak_bytes(functools.partial(decode, msg))
        assert peak < 1_000_000, peak
    # The frame is real: decompressed without limits it is 20 MB.
    assert len(zstandard.ZstdDecompressor().decompress(bomb)) == 20_000_000


def test_claimed_huge_content_size() -> None:
    params = struct.pack("<2e", 0.0, 1.0)
    frame = _forge_content_size(_zstd(bytes(1 << 20)), 0xFFFFFFFF)
    msg = _message(shape=(1 << 16,), flags=1, params=params, payload=frame)
    assert _peak_bytes(lambda: decode(msg)) < 1_000_000


# ----------------------------------------------------------------------------- stability


def _perturbed_pairs(n: int, shape: tuple[int, ...], seed: int) -> list[tuple[np.ndarray, ...]]:
    """Feature-like tensors and the same tensors nudged by about 1e-7, as another runtime's
    convolutions round (ONNX Runtime against PyTorch: median 7e-8, largest 1.3e-6)."""
    rng = _rng(seed)
    x = (rng.normal(size=(n, *shape)) * rng.uniform(0.1, 3, size=(n, shape[0], 1, 1))).astype(
        np.float32
    )
    nudged = (x + rng.normal(scale=2e-7, size=x.shape)).astype(np.float32)
    return list(zip(x, nudged, strict=True))


def test_parameters_do_not_move_with_tiny_differences() -> None:
    """The same head run by two runtimes differs by about 1e-7; the per-group parameters
    (the bytes before the payload) must then almost never differ. Rounding the bounds to
    float16 alone moved them in 26 of these 12,000 tensors (0.22%); the grid, in none."""
    moved = total = 0
    for bits in QBITS:
        pairs = _perturbed_pairs(4000, (8, 4, 4), seed=bits)
        moved += sum(
            codec.split(encode(a, bits, compress=False))[1]
            != codec.split(encode(b, bits, compress=False))[1]
            for a, b in pairs
        )
        total += len(pairs)
    assert moved / total <= 1e-3, f"parameters moved in {moved} of {total}"


def test_a_zero_bound_stays_exact() -> None:
    """ReLU features keep offset 0, so their zeros decode to exactly zero."""
    x = np.maximum(_rng(31).normal(size=(4, 6, 6)), 0).astype(np.float32)
    for bits in QBITS:
        y = decode(encode(x, bits))
        assert (y[x == 0] == 0).all()
        _assert_within_bound(x, encode(x, bits))


# ----------------------------------------------------------------------------- batches


@settings(max_examples=150, deadline=None)
@given(
    x=hnp.arrays(
        st.sampled_from([np.float32, np.float16, np.float64]),
        hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5),
        elements=st.floats(-6e4, 6e4, width=16),
    ),
    bits=st.sampled_from((*QBITS, 16)),
    compress=st.booleans(),
)
def test_property_a_batch_encodes_as_its_tensors_do(
    x: np.ndarray, bits: int, compress: bool
) -> None:
    assert codec.encode_batch(x, bits, compress=compress) == [
        encode(sample, bits, compress=compress) for sample in x
    ]


def test_a_mixed_batch_encodes_as_its_tensors_do() -> None:
    """Tensors that take different paths alone (float16 and float32 parameters, a constant
    group, a step whose reciprocal overflows) keep them in one batch."""
    rng = _rng(40)
    batch = rng.normal(size=(6, 3, 4, 4)).astype(np.float32)
    batch[1] += 1e6  # float32 parameters
    batch[2, 1] = 2.5  # a constant group
    batch[3] = rng.uniform(0, 1e-40, size=(3, 4, 4))  # subnormal steps: divide, not multiply
    batch[4] = np.maximum(batch[4], 0)  # zero minima
    for bits in QBITS:
        payloads = codec.encode_batch(batch, bits)
        assert payloads == [encode(sample, bits) for sample in batch]
        kinds = {read_header(p).param_precision for p in payloads}
        assert kinds == {"float16", "float32"}


@pytest.mark.parametrize("bad", [np.float32(1.0), np.zeros((0, 3), np.float32)])
def test_an_empty_or_scalar_batch_is_refused(bad: np.ndarray) -> None:
    with pytest.raises(CodecError, match="non-empty batch"):
        codec.encode_batch(bad, 8)


def test_one_bad_tensor_fails_the_batch_as_it_would_alone() -> None:
    batch = np.zeros((3, 2, 2), np.float32)
    batch[2, 0, 0] = np.nan
    with pytest.raises(CodecError, match="NaN"):
        codec.encode_batch(batch, 4)


def test_a_tensor_beside_a_dividing_one_still_multiplies() -> None:
    """A tensor whose steps' reciprocals are finite quantizes by multiplying, in a batch too,
    even beside one that must divide: the two round differently at some half-way values."""
    x = np.zeros((1, 16, 16), np.float32)
    x[0, 0, :2] = (-1.0, 2.0)  # fixes the parameters
    h = read_header(encode(x, 8))
    assert h.offset is not None and h.scale is not None
    off, step = np.float32(h.offset[0]), np.float32(h.scale[0])
    halfway = (off + (np.arange(254) % 255 + 0.5).astype(np.float32) * step).astype(np.float32)
    x[0].flat[2:] = halfway
    t = x.reshape(-1) - off
    assert (np.rint(t * (np.float32(1) / step)) != np.rint(t / step)).any()  # it can tell
    tiny = _rng(41).uniform(0, 1e-40, size=(1, 16, 16)).astype(np.float32)
    batch = np.stack([x, tiny])
    assert codec.encode_batch(batch, 8) == [encode(x, 8), encode(tiny, 8)]


@pytest.mark.parametrize("bits", QBITS)
def test_a_range_near_the_float32_limit_still_encodes(bits: int) -> None:
    """Snapping widens a group's range a little; where that would carry its reach past
    float32, the group is quantized unsnapped, as it was before the grid."""
    x = np.array([-6.40236620495853e37, 2.1202780730164255e38], np.float32)
    _assert_within_bound(x, encode(x, bits))
    assert codec.encode_batch(np.stack([x, x / 2]), bits) == [encode(x, bits), encode(x / 2, bits)]


def test_encode_batch_takes_one_array_not_a_list_of_them() -> None:
    """A list would be promoted to one dtype, and its float16 tensors would come back as
    float32 bytes: refused instead."""
    with pytest.raises(CodecError, match="one array or tensor"):
        codec.encode_batch([np.zeros((2, 2), np.float16), np.zeros((2, 2), np.float32)], 4)
