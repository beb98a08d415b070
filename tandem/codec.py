"""Compact, self-describing encoding of float tensors for the edge-cloud split.

A tensor is either passed through as float16 (``bits=16``) or quantized with a
per-channel affine map to 8, 4 or 2 bits per value, bit-packed, and optionally
compressed with zstd.  The result is a single ``bytes`` object whose header
describes everything needed to decode it.

Channel grouping
----------------
Quantization parameters are shared by a *group* of values: one group per plane
spanned by the last two axes.  For ``ndim >= 2`` there are
``groups = prod(shape[:-2])`` groups (a ``(C, H, W)`` tensor gets ``C`` groups,
an ``(N, C, H, W)`` batch gets ``N * C``, i.e. per sample and per channel; a 2-D
tensor gets one).  Tensors with ``ndim <= 1`` form a single group.

Quantization
------------
For a group with minimum ``lo`` and maximum ``hi``, and ``L = 2**bits - 1``::

    g      = 2**(floor(log2(hi - lo)) - 6)       (the group's grid spacing)
    lo'    = largest  (k + phi) * g <= lo        (k an integer, phi = 0.618...)
    hi'    = smallest (k + phi) * g >= hi
    offset = lo' rounded down (toward -inf) to the parameter precision
    step   = (hi' - offset) / L rounded up to the parameter precision
    q      = clip(rint((x - offset) / step), 0, L)
    x'     = q * step + offset

Snapping the bounds to the grid keeps the parameters the same for two inputs
that differ by much less than ``g`` (the odds that a bound moves are about the
difference over ``g``): the same head run by PyTorch and by ONNX Runtime, about
1e-7 apart, gets the same parameters, where rounding ``lo`` and ``hi`` to
float16 alone moved them in 0.35 to 1.4% of tensors.  (A symbol at a rounding
edge can still differ; see ``bench/head.py``.)  Snapping widens the range by at
most ``2 * g <= (hi - lo) / 32``, so the step is at most 1/32 larger (1/30 with
float32 parameters, whose offset can round down past a power of two); the mean
squared error grew by 3 to 4% on the features of trained bundles.  A minimum of
exactly zero (a ReLU's) stays the offset, so zeros decode to zero, and a maximum
of zero is kept too; where the parameter precision is coarser than ``g`` at
``lo``, the offset is ``lo`` rounded down; and a group whose snapped reach would
leave float32 is not snapped.  :func:`decode` does not depend on how the
parameters were chosen.

Because the *stored* (rounded) parameters are used for quantization and they
are rounded outward, every value of the group lies in
``[offset, offset + L * step]`` and ``|x' - x| <= step / 2`` holds for every
element, up to float32 rounding.  A constant group has ``step == 0`` and decodes
exactly to ``offset``.  Parameters are stored as float16 when that costs at most
``2**-6`` relative precision of the step (over the snapped range's) for every
group and represents constant groups exactly; otherwise all parameters are
stored as float32 and the ``fp32 params`` flag is set.  A group whose reach
``|offset| + L * step`` exceeds the float32 range cannot be quantized (:func:`encode` raises, and
:func:`decode` rejects such parameters), so decoded values are always finite;
float16 results are clipped to the float16 range.  Float64 inputs are rounded to
float32 before quantizing.

Byte layout (little-endian)
---------------------------
======  ==================================================================
offset  content
======  ==================================================================
0       magic byte ``0xEC``
1       ``version << 4 | flags``; version is 1; flags bit 0 = payload is a
        zstd frame, bit 1 = parameters are float32 (else float16), bits 2-3
        reserved (must be 0)
2       ``bits_code << 6 | dtype_code << 4 | ndim``; bits_code 0..3 means
        2, 4, 8, 16 bits; dtype_code 0 = float32, 1 = float16, 2 = float64
        (the original dtype, restored by :func:`decode`); ``ndim <= MAX_NDIM``
3...    each dimension as an unsigned LEB128 varint (``1 <= d <= MAX_DIM``)
...     payload length in bytes as an unsigned LEB128 varint
...     parameters, absent for 16 bits: ``groups`` pairs ``(offset, step)``
        as ``<f2`` or ``<f4``
...     payload: exactly ``payload length`` bytes, nothing after it
======  ==================================================================

Varints are canonical: at most 5 bytes and no redundant trailing zero byte.

The payload before compression is ``<f2`` values for 16 bits, one byte per
value for 8 bits, two values per byte for 4 bits and four per byte for 2 bits.
Packed values fill each byte from the least significant bits up (element ``i``
of a byte holding ``k`` values sits at bit ``i * bits``); unused bits in the
last byte are zero.  With zstd, the payload is one zstd frame that records its
content size, which must equal the packed size; zstd is used only when the
frame is strictly smaller than the packed payload.

A ``(2, 7, 7)`` tensor at 4 bits with float16 parameters has a 15-byte header
(7 fixed/varint bytes and 8 parameter bytes) followed by a 49-byte payload.

Decoding validates the whole header against hard caps before allocating
anything whose size comes from the input, and raises only :class:`CodecError`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import zstandard

__all__ = [
    "INTERNAL_ERROR_PREFIX",
    "MAGIC",
    "MAX_DIM",
    "MAX_ELEMENTS",
    "MAX_NDIM",
    "SUPPORTED_BITS",
    "VERSION",
    "CodecError",
    "Header",
    "decode",
    "encode",
    "encode_batch",
    "quantization_step",
    "read_header",
]

SUPPORTED_BITS: Final = (2, 4, 8, 16)
"""Bits per value that :func:`encode` accepts; 16 is a float16 passthrough."""

MAX_ELEMENTS: Final = 1 << 24
"""Default cap on the number of elements of a tensor (encode and decode)."""

MAX_NDIM: Final = 6
"""Maximum number of dimensions of an encoded tensor."""

MAX_DIM: Final = 1 << 24
"""Maximum size of a single dimension."""

MAGIC: Final = 0xEC
"""First byte of every encoded tensor."""

VERSION: Final = 1
"""Format version written by :func:`encode`; the only one :func:`decode` accepts."""

_FLAG_ZSTD: Final = 0x1
_FLAG_FP32_PARAMS: Final = 0x2
_FLAG_RESERVED: Final = 0xC

_BITS_BY_CODE: Final = (2, 4, 8, 16)
_CODE_BY_BITS: Final = {b: i for i, b in enumerate(_BITS_BY_CODE)}
_DTYPES: Final = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))

INTERNAL_ERROR_PREFIX: Final = "internal decoder error"
"""Prefix of the message of a :class:`CodecError` wrapping an unexpected exception.

:func:`decode` validates its input explicitly; an unexpected exception is still
converted to :class:`CodecError` (with this prefix) so that nothing else escapes."""

_MAX_VARINT_BYTES: Final = 5
_FP16_STEP_REL_TOL: Final = 2.0**-6
# The grid that bounds are snapped to: 2**-6 to 2**-7 of a group's range, costing about
# 2**-5 of the step at most. At 2**-8, four bundles (two of digits, MNIST, CIFAR-10) still
# had 0.01 to 0.13% of 2-bit payloads (where every difference is in the parameters)
# differing between PyTorch and ONNX Runtime; at 2**-6, 0 to 0.06%, for 2% more squared
# error. Its points sit at the golden ratio's fraction of a spacing, computed in float64:
# a float32 value (24 significant bits) cannot sit exactly on one, as it could on a
# dyadic grid.
_GRID_BITS: Final = 6
_GRID_PHASE: Final = 0.6180339887498949
_F32_MAX: Final = float(np.finfo(np.float32).max)
_F16_MAX: Final = float(np.finfo(np.float16).max)
# A zstd frame is at least 4 (magic) + 2 (frame header) + 3 (block header) bytes,
# so a payload this short can never shrink.
_MIN_ZSTD_INPUT: Final = 10


class CodecError(ValueError):
    """Raised for any tensor that cannot be encoded or any bytes that do not decode."""


@dataclass(frozen=True, eq=False)
class Header:
    """The validated header of an encoded tensor (see the module docstring).

    Attributes:
        version: format version (always :data:`VERSION`).
        dtype: the original dtype, restored by :func:`decode`.
        bits: bits per value, one of :data:`SUPPORTED_BITS`.
        shape: the tensor shape.
        compressed: whether the payload is a zstd frame.
        param_precision: ``"float16"`` or ``"float32"`` for quantized tensors,
            ``None`` for the 16-bit passthrough (which has no parameters).
        header_size: bytes before the payload, parameters included.
        payload_size: bytes of the (possibly compressed) payload.
        scale: per-group quantization step as float32, or ``None`` for 16 bits.
        offset: per-group offset (the value of code 0) as float32, or ``None``.
    """

    version: int
    dtype: np.dtype[Any]
    bits: int
    shape: tuple[int, ...]
    compressed: bool
    param_precision: str | None
    header_size: int
    payload_size: int
    scale: np.ndarray | None
    offset: np.ndarray | None

    @property
    def n_elements(self) -> int:
        """Number of elements of the tensor."""
        return math.prod(self.shape)

    @property
    def groups(self) -> int:
        """Number of parameter groups (planes of the last two axes)."""
        return _n_groups(self.shape)

    @property
    def packed_size(self) -> int:
        """Size in bytes of the bit-packed payload before compression."""
        return _packed_size(self.n_elements, self.bits)

    @property
    def total_size(self) -> int:
        """Size in bytes of the whole encoded message."""
        return self.header_size + self.payload_size


def quantization_step(header: Header) -> np.ndarray | None:
    """Return the per-group quantization step of ``header`` (float32, one per group).

    Every decoded element differs from the encoded one by at most half the step of
    its group (plus float32 rounding).  Returns ``None`` for the 16-bit passthrough,
    whose error is float16 rounding instead.
    """
    return None if header.scale is None else header.scale


# ----------------------------------------------------------------------------- helpers


_tls = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_tls, "cctx", None)
    if cache is None:
        cache = {}
        _tls.cctx = cache
    cctx = cache.get(level)
    if cctx is None:
        cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        cache[level] = cctx
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_tls, "dctx", None)
    if dctx is None:
        dctx = zstandard.ZstdDecompressor()
        _tls.dctx = dctx
    return dctx


def _n_groups(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-2]) if len(shape) >= 2 else 1


def _packed_size(n: int, bits: int) -> int:
    return 2 * n if bits == 16 else (n * bits + 7) // 8


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _get_varint(buf: memoryview, pos: int, what: str) -> tuple[int, int]:
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(buf):
            raise CodecError(f"truncated header: {what} varint runs past the end")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise CodecError(f"non-canonical (overlong) varint for {what}")
            return value, pos + i + 1
    raise CodecError(f"varint for {what} longer than {_MAX_VARINT_BYTES} bytes")


def _round_directed(values: np.ndarray, dtype: type[np.floating], up: bool) -> np.ndarray:
    """Round float64 ``values`` to ``dtype``, toward +inf if ``up`` else toward -inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        r = values.astype(dtype)
        wrong = r.astype(np.float64) < values if up else r.astype(np.float64) > values
        if wrong.any():
            r[wrong] = np.nextafter(r[wrong], dtype(np.inf if up else -np.inf))
    return r


def _cover(offset: np.ndarray, step: np.ndarray, hi: np.ndarray, levels: int) -> np.ndarray:
    """Nudge ``step`` up until ``offset + levels * step >= hi`` (checked in float64)."""
    for _ in range(4):
        short = offset.astype(np.float64) + levels * step.astype(np.float64) < hi
        if not short.any():
            break
        with np.errstate(over="ignore"):
            step[short] = np.nextafter(step[short], step.dtype.type(np.inf))
    return step


def _snap(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(low, high, grid)``: each group's ``[lo, hi]`` widened outward to the
    nearest points of its grid (float64 in and out).

    The grid's spacing is a power of two, ``2**-(_GRID_BITS + 1)`` to ``2**-_GRID_BITS``
    of the group's range, and its points sit at the golden ratio's fraction of a spacing
    (so no float32 value is ever exactly on one, as short dyadic values often would be).
    A bound then moves only when its value crosses a grid point, so two runtimes whose
    features differ by about 1e-7 choose the same parameters unless a value lies within
    that distance of a point (odds about 1e-7 / spacing, per bound). A bound of exactly
    zero stays put (both runtimes clamp a ReLU to the same zero), so a minimum of zero
    is the offset and zeros decode to zero. Constant groups get a zero grid and keep
    their value. (A bound snapped past the float32 range is left to
    :func:`_float32_params`, which then quantizes that group unsnapped.)
    """
    span = hi - lo
    _, exponent = np.frexp(span)
    shift = exponent - (1 + _GRID_BITS)
    grid = np.ldexp(1.0, shift)
    per_unit = 1.0 / grid  # exact: a power of two
    low = (np.floor(lo * per_unit - _GRID_PHASE) + _GRID_PHASE) * grid
    high = (np.ceil(hi * per_unit - _GRID_PHASE) + _GRID_PHASE) * grid
    # Fix-ups (constant groups, zero bounds) are tested for once, and done only when a
    # group needs one. The product cannot underflow: float32 inputs multiply to at least
    # about 1e-135 in float64.
    if (lo * hi * span == 0).any():
        constant = span == 0
        low = np.where(constant | (lo == 0), lo, low)
        high = np.where(constant | (hi == 0), hi, high)
        grid = np.where(constant, 0.0, grid)
    return low, high, grid


def _params_in(
    dtype: type[np.floating],
    lo: np.ndarray,
    hi: np.ndarray,
    snapped: tuple[np.ndarray, ...],
    levels: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(offset, step)`` in ``dtype``, rounded outward from the snapped bounds.

    Where ``dtype``'s own spacing at ``lo`` is coarser than the grid, snapping gains no
    stability and would waste up to that spacing, so the offset is ``lo`` rounded down.
    """
    low, high, grid = snapped
    with np.errstate(over="ignore", invalid="ignore"):
        coarse = np.abs(np.spacing(lo.astype(dtype))) > grid
        offset = _round_directed(np.where(coarse, lo, low), dtype, up=False)
        step = _round_directed((high - offset.astype(np.float64)) / levels, dtype, up=True)
        return offset, _cover(offset, step, hi, levels)


def _choose_params(lo: np.ndarray, hi: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(params, fp32)`` for ``(tensors, groups)`` minima and maxima: ``params`` is a
    ``(tensors, groups, 2)`` float32 array of ``(offset, step)``, each rounded outward in its
    tensor's storage precision, and ``fp32`` says, per tensor, whether that is float32."""
    lo64 = lo.astype(np.float64)
    hi64 = hi.astype(np.float64)
    snapped = _snap(lo64, hi64)
    ideal = (snapped[1] - snapped[0]) / levels  # the snapped range's: float16 costs on top
    off16, step16 = _params_in(np.float16, lo64, hi64, snapped, levels)
    constant = hi64 == lo64
    with np.errstate(invalid="ignore"):
        coarse = step16.astype(np.float64) > ideal * (1.0 + _FP16_STEP_REL_TOL)
        bad = ~(np.isfinite(off16) & np.isfinite(step16))
    bad |= (constant & (off16 != lo64)) | (~constant & coarse)
    fp32 = bad.any(axis=1)
    params = np.stack([off16, step16], axis=-1).astype(np.float32)
    if fp32.any():
        picked = tuple(a[fp32] for a in snapped)
        params[fp32] = _float32_params(lo64[fp32], hi64[fp32], picked, levels)
    return params, fp32


def _float32_params(
    lo: np.ndarray, hi: np.ndarray, snapped: tuple[np.ndarray, ...], levels: int
) -> np.ndarray:
    """``(tensors, groups, 2)`` float32 parameters for these minima, maxima and their
    snapped bounds.

    A group whose snapped range would reach past float32 (the grid widens it by up to
    ``2 * grid``) is quantized unsnapped, which reaches only as far as it must; the choice
    is per group, so a tensor's bytes do not depend on the rest of its batch.
    """
    offset, step = _params_in(np.float32, lo, hi, snapped, levels)
    fits = _within_float32(offset, step, levels)
    if not fits.all():
        plain = _params_in(np.float32, lo, hi, (lo, hi, np.zeros_like(lo)), levels)
        offset, step = np.where(fits, offset, plain[0]), np.where(fits, step, plain[1])
        if not _within_float32(offset, step, levels).all():
            raise CodecError("value range too large to quantize within float32")
    return np.stack([offset, step], axis=-1)


def _within_float32(offset: np.ndarray, step: np.ndarray, levels: int) -> np.ndarray:
    """Whether each group's parameters, and the reach ``|offset| + levels * step``, are
    finite float32 values."""
    with np.errstate(over="ignore", invalid="ignore"):
        reach = np.abs(offset.astype(np.float64)) + levels * step.astype(np.float64)
        return np.isfinite(offset) & np.isfinite(step) & (reach <= _F32_MAX)


def _as_array(x: Any) -> np.ndarray:
    mod = type(x).__module__
    if mod == "torch" or mod.startswith("torch."):
        import torch  # lazy: the codec works with numpy alone

        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        try:
            return np.asarray(t.numpy())
        except (TypeError, RuntimeError) as exc:
            raise CodecError(f"cannot convert tensor of dtype {t.dtype}: {exc}") from exc
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"cannot convert input to an array: {exc}") from exc


def _pack(q: np.ndarray, bits: int) -> bytes:
    """Pack flat uint8 codes (each < 2**bits) into bytes, low bits first."""
    if bits == 8:
        return q.tobytes()
    per = 8 // bits
    n = q.size
    pad = -n % per
    if pad:
        q = np.concatenate([q, np.zeros(pad, dtype=np.uint8)])
    cols = q.reshape(-1, per)
    packed = cols[:, 0].copy()
    for i in range(1, per):
        packed |= cols[:, i] << np.uint8(i * bits)
    return packed.tobytes()


def _unpack(raw: bytes | memoryview, bits: int, n: int) -> np.ndarray:
    """Unpack ``n`` codes from packed bytes, rejecting non-zero padding bits."""
    p = np.frombuffer(raw, dtype=np.uint8)
    if bits == 8:
        return p
    per = 8 // bits
    used = n - (p.size - 1) * per  # codes in the last byte, 1..per
    if used < per and int(p[-1]) >> (used * bits):
        raise CodecError("non-zero padding bits in the last payload byte")
    mask = np.uint8((1 << bits) - 1)
    q = np.empty(p.size * per, dtype=np.uint8)
    np.bitwise_and(p, mask, out=q[0::per])
    for i in range(1, per):
        dst = q[i::per]
        np.right_shift(p, np.uint8(i * bits), out=dst)
        if i < per - 1:
            np.bitwise_and(dst, mask, out=dst)
    return q[:n]


# ----------------------------------------------------------------------------- encode


def encode(x: Any, bits: int, *, compress: bool = True, level: int = 3) -> bytes:
    """Encode a float tensor to compact bytes.

    Args:
        x: a float16/float32/float64 numpy array (or a ``torch.Tensor``, converted
            with ``.detach().cpu().numpy()``), finite, non-empty, with at most
            :data:`MAX_NDIM` dimensions and :data:`MAX_ELEMENTS` elements.
        bits: one of :data:`SUPPORTED_BITS`; 16 stores float16 values, 8/4/2 quantize
            per channel (one ``(offset, step)`` pair per plane of the last two axes).
        compress: try zstd on the packed payload, keeping it only if strictly smaller.
        level: the zstd compression level.

    Returns:
        The encoded message (see the module docstring for the layout).

    Raises:
        CodecError: for unsupported bits, a non-float dtype, non-finite values, an
            empty or too large tensor, or values outside the representable range.
    """
    return _encode_rows(_as_array(x)[None], bits, compress, level)[0]


def encode_batch(x: Any, bits: int, *, compress: bool = True, level: int = 3) -> list[bytes]:
    """Encode each ``x[i]`` to the bytes that ``encode(x[i], bits, ...)`` gives, in one pass.

    ``x`` is one float array (or ``torch.Tensor``) whose first axis is the batch: a list or
    tuple is refused, since converting it would give its tensors one common dtype. The
    per-call work (parameters, quantization) is done once for the whole batch, which makes
    a batch of small tensors (a head's output) several times faster per tensor.

    Raises:
        CodecError: as :func:`encode` would for any one tensor of the batch (the first
            problem found fails the batch), or for an empty batch or a 0-d ``x``.
    """
    if isinstance(x, list | tuple):  # numpy would promote its tensors to one dtype
        raise CodecError("encode_batch takes one array or tensor with a leading batch axis")
    arr = _as_array(x)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise CodecError(f"expected a non-empty batch of tensors, got shape {arr.shape}")
    return _encode_rows(arr, bits, compress, level)


def _checked_bits(bits: Any) -> int:
    if (
        isinstance(bits, bool)
        or not isinstance(bits, int | np.integer)
        or int(bits) not in _CODE_BY_BITS
    ):
        raise CodecError(f"unsupported bits {bits!r}; expected one of {SUPPORTED_BITS}")
    return int(bits)


def _check_level(level: Any) -> None:
    if (
        isinstance(level, bool)
        or not isinstance(level, int)
        or not -(1 << 17) <= level <= zstandard.MAX_COMPRESSION_LEVEL
    ):
        raise CodecError(f"invalid zstd level {level!r}")


def _encode_rows(arr: np.ndarray, bits: Any, compress: bool, level: Any) -> list[bytes]:
    """Encode each ``arr[i]`` (``arr`` has a leading batch axis) as :func:`encode` does."""
    bits = _checked_bits(bits)
    _check_level(level)
    dt = arr.dtype
    if dt.kind != "f" or dt.itemsize not in (2, 4, 8):
        raise CodecError(f"expected a float16/32/64 tensor, got dtype {dt}")
    dtype_code = {4: 0, 2: 1, 8: 2}[dt.itemsize]
    shape = tuple(int(d) for d in arr.shape[1:])
    if len(shape) > MAX_NDIM:
        raise CodecError(f"tensor has {len(shape)} dimensions; at most {MAX_NDIM} supported")
    n = math.prod(shape)
    if n == 0:
        raise CodecError("cannot encode an empty tensor")
    if n > MAX_ELEMENTS or any(d > MAX_DIM for d in shape):
        raise CodecError(f"tensor of shape {shape} exceeds the size caps")

    if bits == 16:
        parts = [(b"", False, _encode_f16(sample)) for sample in arr]
    else:
        parts = _encode_quantized(arr, bits, shape)
    return [
        _finish(bits, dtype_code, shape, params, fp32, payload, compress, level)
        for params, fp32, payload in parts
    ]


def _finish(
    bits: int,
    dtype_code: int,
    shape: tuple[int, ...],
    params: bytes,
    fp32: bool,
    payload: bytes,
    compress: bool,
    level: int,
) -> bytes:
    """Compress the payload when that makes it strictly smaller, then lay out the message."""
    flags = _FLAG_FP32_PARAMS if fp32 else 0
    if compress and len(payload) >= _MIN_ZSTD_INPUT:
        try:
            frame = _compressor(level).compress(payload)
        except (zstandard.ZstdError, ValueError, TypeError) as exc:
            raise CodecError(f"zstd compression failed: {exc}") from exc
        if len(frame) < len(payload):
            payload = frame
            flags |= _FLAG_ZSTD
    return _assemble(flags, bits, dtype_code, shape, params, payload)


def _assemble(
    flags: int, bits: int, dtype_code: int, shape: tuple[int, ...], params: bytes, payload: bytes
) -> bytes:
    out = bytearray(
        (MAGIC, (VERSION << 4) | flags, (_CODE_BY_BITS[bits] << 6) | (dtype_code << 4) | len(shape))
    )
    for d in shape:
        _put_varint(out, d)
    _put_varint(out, len(payload))
    out += params
    out += payload
    return bytes(out)


def assemble(
    *,
    dtype: Any,
    bits: int,
    shape: tuple[int, ...],
    compressed: bool,
    fp32_params: bool,
    params: bytes,
    payload: bytes,
) -> bytes:
    """Build encoded bytes from header fields carried separately (the wire message's fields).

    Only what cannot be expressed in the byte layout is checked here; everything else,
    lengths and values included, is validated by :func:`decode` as for any other input.

    Raises:
        CodecError: for bits, a dtype, a rank or a dimension the layout cannot hold.
    """
    if bits not in _CODE_BY_BITS:
        raise CodecError(f"unsupported bits {bits!r}; expected one of {SUPPORTED_BITS}")
    try:
        dtype_code = _DTYPES.index(np.dtype(dtype))
    except (TypeError, ValueError) as exc:
        raise CodecError(f"unsupported dtype {dtype!r}") from exc
    if len(shape) > MAX_NDIM or any(not 1 <= d <= MAX_DIM for d in shape):
        raise CodecError(f"shape {shape} outside the caps ({MAX_NDIM} dims of 1..{MAX_DIM})")
    flags = (_FLAG_ZSTD if compressed else 0) | (_FLAG_FP32_PARAMS if fp32_params else 0)
    return _assemble(flags, bits, dtype_code, tuple(shape), bytes(params), bytes(payload))


def split(data: bytes | bytearray | memoryview) -> tuple[Header, bytes, bytes]:
    """Validate the header and return it with the raw parameter and payload bytes.

    The inverse of :func:`assemble`: ``assemble(...)`` of the parts gives back ``data``.

    Raises:
        CodecError: if the header is malformed (see :func:`read_header`).
    """
    buf = _buffer(data)
    header = read_header(buf)
    param_bytes = 0
    if header.scale is not None:
        param_bytes = 2 * header.groups * (4 if header.param_precision == "float32" else 2)
    start = header.header_size - param_bytes
    return (
        header,
        bytes(buf[start : header.header_size]),
        bytes(buf[header.header_size : header.total_size]),
    )


def _encode_f16(arr: np.ndarray) -> bytes:
    with np.errstate(invalid="ignore"):
        lo = float(arr.min())
        hi = float(arr.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CodecError("tensor contains NaN or infinite values")
    with np.errstate(over="ignore"):
        half = arr.astype("<f2")
    if not np.isfinite(half.min()) or not np.isfinite(half.max()):
        raise CodecError("tensor values exceed the float16 range required by bits=16")
    return half.tobytes()


def _encode_quantized(
    arr: np.ndarray, bits: int, shape: tuple[int, ...]
) -> list[tuple[bytes, bool, bytes]]:
    """``(parameter bytes, fp32, packed payload)`` for each ``arr[i]``."""
    levels = (1 << bits) - 1
    count, groups = arr.shape[0], _n_groups(shape)
    if arr.dtype != np.float32:
        if arr.dtype.itemsize == 8:
            with np.errstate(invalid="ignore"):
                big = float(np.max(np.abs(arr)))
            if math.isfinite(big) and big > _F32_MAX:
                raise CodecError("tensor values exceed the float32 range")
        with np.errstate(over="ignore", invalid="ignore"):
            arr = arr.astype(np.float32)
    x2 = np.ascontiguousarray(arr).reshape(count * groups, -1)
    with np.errstate(invalid="ignore"):
        lo = np.minimum.reduce(x2, axis=1)
        hi = np.maximum.reduce(x2, axis=1)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise CodecError("tensor contains NaN or infinite values")

    params, fp32 = _choose_params(lo.reshape(count, groups), hi.reshape(count, groups), levels)
    off = params[..., 0].reshape(-1)
    step = params[..., 1].reshape(-1)

    t = np.subtract(x2, off[:, None], dtype=np.float32)
    with np.errstate(over="ignore", divide="ignore"):
        inv = np.divide(1.0, step, out=np.zeros_like(step), where=step > 0)
    # A tensor with a step so small that its reciprocal overflows float32 divides instead,
    # all its groups alike (as encoding it alone would).
    finite = np.isfinite(inv).reshape(count, groups).all(axis=1)
    if finite.all():
        np.multiply(t, inv[:, None], out=t)
    else:
        rows = np.repeat(finite, groups)
        np.multiply(t, inv[:, None], out=t, where=rows[:, None])
        safe = np.where(step > 0, step, np.float32(1.0))
        np.divide(t, safe[:, None], out=t, where=~rows[:, None])
    np.rint(t, out=t)
    np.clip(t, 0.0, float(levels), out=t)
    q = t.astype(np.uint8).reshape(count, -1)
    return [
        (params[i].astype("<f4" if fp32[i] else "<f2").tobytes(), bool(fp32[i]), _pack(q[i], bits))
        for i in range(count)
    ]


# ----------------------------------------------------------------------------- decode


def _buffer(data: Any) -> memoryview:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"expected bytes, bytearray or memoryview, got {type(data).__name__}")
    try:
        mv = memoryview(data)
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
    except (TypeError, ValueError) as exc:
        raise CodecError(f"unusable buffer: {exc}") from exc
    return mv


def _parse(buf: memoryview, max_elements: int) -> Header:
    size = len(buf)
    if size < 3:
        raise CodecError("truncated header")
    if buf[0] != MAGIC:
        raise CodecError(f"bad magic byte 0x{buf[0]:02x}")
    version, flags = buf[1] >> 4, buf[1] & 0x0F
    if version != VERSION:
        raise CodecError(f"unsupported codec version {version}")
    if flags & _FLAG_RESERVED:
        raise CodecError("reserved flag bits are set")
    bits = _BITS_BY_CODE[buf[2] >> 6]
    dtype_code = (buf[2] >> 4) & 0x3
    if dtype_code >= len(_DTYPES):
        raise CodecError(f"unknown dtype code {dtype_code}")
    ndim = buf[2] & 0x0F
    if ndim > MAX_NDIM:
        raise CodecError(f"ndim {ndim} exceeds {MAX_NDIM}")
    fp32 = bool(flags & _FLAG_FP32_PARAMS)
    compressed = bool(flags & _FLAG_ZSTD)
    if bits == 16 and fp32:
        raise CodecError("parameter precision flag set for a 16-bit tensor")

    pos = 3
    shape: list[int] = []
    n = 1
    for axis in range(ndim):
        d, pos = _get_varint(buf, pos, f"dim {axis}")
        if d < 1 or d > MAX_DIM:
            raise CodecError(f"dimension {axis} = {d} outside [1, {MAX_DIM}]")
        n *= d
        if n > max_elements:
            raise CodecError(f"element count exceeds the cap of {max_elements}")
        shape.append(d)
    payload_size, pos = _get_varint(buf, pos, "payload length")

    shape_t = tuple(shape)
    groups = _n_groups(shape_t)
    psize = 4 if fp32 else 2
    param_bytes = 0 if bits == 16 else 2 * groups * psize
    if pos + param_bytes > size:
        raise CodecError("truncated: parameter region incomplete")
    header_size = pos + param_bytes
    remaining = size - header_size
    if payload_size > remaining:
        raise CodecError(f"truncated payload: {remaining} of {payload_size} bytes present")
    if payload_size < remaining:
        raise CodecError(f"{remaining - payload_size} bytes of trailing data after the payload")
    expected = _packed_size(n, bits)
    if compressed:
        if payload_size >= expected:
            raise CodecError("compressed payload is not smaller than the packed payload")
        try:
            content = zstandard.frame_content_size(buf[header_size:])
        except (zstandard.ZstdError, ValueError, TypeError) as exc:
            raise CodecError(f"invalid zstd frame header: {exc}") from exc
        if content != expected:
            raise CodecError(f"zstd frame content size {content} != expected {expected}")
    elif payload_size != expected:
        raise CodecError(f"payload is {payload_size} bytes, expected {expected}")

    scale: np.ndarray | None = None
    offset: np.ndarray | None = None
    if bits != 16:
        raw = np.frombuffer(buf, dtype="<f4" if fp32 else "<f2", count=2 * groups, offset=pos)
        params = raw.astype(np.float32).reshape(groups, 2)
        offset = np.ascontiguousarray(params[:, 0])
        scale = np.ascontiguousarray(params[:, 1])
        if not (np.isfinite(offset).all() and np.isfinite(scale).all()):
            raise CodecError("non-finite quantization parameters")
        if (scale < 0).any():
            raise CodecError("negative quantization step")
        levels = (1 << bits) - 1
        reach = np.abs(offset.astype(np.float64)) + levels * scale.astype(np.float64)
        if (reach > _F32_MAX).any():
            raise CodecError("quantization parameters overflow float32")
        offset.setflags(write=False)
        scale.setflags(write=False)

    return Header(
        version=version,
        dtype=_DTYPES[dtype_code],
        bits=bits,
        shape=shape_t,
        compressed=compressed,
        param_precision=None if bits == 16 else ("float32" if fp32 else "float16"),
        header_size=header_size,
        payload_size=payload_size,
        scale=scale,
        offset=offset,
    )


def read_header(
    data: bytes | bytearray | memoryview, *, max_elements: int = MAX_ELEMENTS
) -> Header:
    """Parse and validate the header of an encoded tensor without decoding its payload.

    All header fields, the parameters, the exact payload length and (for zstd) the
    frame's declared content size are checked.

    Raises:
        CodecError: if anything is malformed or exceeds the caps.
    """
    with _codec_errors_only():
        return _parse(_buffer(data), max_elements)


def decode(data: bytes | bytearray | memoryview, *, max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """Decode bytes produced by :func:`encode` into a new, writable numpy array.

    The result has the encoded shape and the recorded original dtype (float32,
    float16 or float64; values are computed in float32).

    Args:
        data: the encoded message.
        max_elements: reject tensors with more elements than this, before allocating.

    Raises:
        CodecError: for any malformed, truncated, oversized or inconsistent input;
            no other exception escapes.
    """
    with _codec_errors_only():
        return _decode(_buffer(data), max_elements)


@contextmanager
def _codec_errors_only() -> Iterator[None]:
    """Turn any escaped exception into a CodecError: validation should make this unreachable."""
    try:
        yield
    except CodecError:
        raise
    except Exception as exc:
        raise _internal(exc) from exc


def _internal(exc: BaseException) -> CodecError:
    if isinstance(exc, MemoryError):
        return CodecError("out of memory while decoding")
    return CodecError(f"{INTERNAL_ERROR_PREFIX}: {type(exc).__name__}: {exc}")


def _decode(buf: memoryview, max_elements: int) -> np.ndarray:
    header = _parse(buf, max_elements)
    n = header.n_elements
    expected = header.packed_size
    body = buf[header.header_size :]
    raw: bytes | memoryview
    if header.compressed:
        try:
            raw = _decompressor().decompress(body, max_output_size=expected, allow_extra_data=False)
        except (zstandard.ZstdError, MemoryError, ValueError, OverflowError) as exc:
            raise CodecError(f"zstd decompression failed: {exc}") from exc
        if len(raw) != expected:
            raise CodecError(f"decompressed {len(raw)} bytes, expected {expected}")
    else:
        raw = body

    if header.bits == 16:
        half = np.frombuffer(raw, dtype="<f2", count=n)
        if not (np.isfinite(half.min()) and np.isfinite(half.max())):
            raise CodecError("non-finite value in a 16-bit payload")
        out = half.astype(header.dtype).reshape(header.shape)
        return out

    if header.scale is None or header.offset is None:  # pragma: no cover - set by _parse
        raise CodecError("missing quantization parameters")
    q = _unpack(raw, header.bits, n)
    groups = header.groups
    vals = q.reshape(groups, -1).astype(np.float32)
    vals *= header.scale[:, None]
    vals += header.offset[:, None]
    if header.dtype == np.float16:
        np.clip(vals, -_F16_MAX, _F16_MAX, out=vals)
    return vals.astype(header.dtype, copy=False).reshape(header.shape)
