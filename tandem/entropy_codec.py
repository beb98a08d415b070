"""Codec v2: range coding of a learned entropy model's integer symbols.

The torch-side entropy model (:mod:`tandem.entropy`) turns a bottleneck into integer
symbols and, per operating point, one quantized probability table per channel
(:class:`EntropyTables`).  This module codes a ``(k, H, W)`` symbol array against the
first ``k`` rows of such tables (a slimmable model sends a channel prefix).  It imports
only numpy, constriction and the standard library, so a device can run it without torch.

Byte layout
-----------
======  ==================================================================
offset  content
======  ==================================================================
0       ``0b10_www_ppp``: the top two bits ``10`` mark v2 (a v1 message starts
        with :data:`tandem.codec.MAGIC` ``0xEC``, top bits ``11``); ``www`` is
        the sender's width, as its index ``0..MAX_WIDTHS-1`` among the bundle's
        sorted widths, and ``ppp`` the operating point ``0..MAX_POINTS-1`` whose
        tables coded the symbols
1...    the canonical range-coded payload (below), nothing after it
======  ==================================================================

Nothing else is sent: the receiver takes the shape ``(k, H, W)`` from its bundle and the
tables from the point, so the symbol count never comes from the payload. The width index
is there so that a receiver told another width (in its request) refuses the message
instead of decoding it at the wrong shape: a range decoder would map it to other symbols
without noticing.  A ``(8, 7, 7)``
sample at 2.3 bits of information per symbol is 1 + ~112.5 bytes.

Tables and models
-----------------
Row ``c`` gives symbol ``offset[c] + j`` the probability ``freqs[c, j] / 2**PRECISION``
for ``j < length[c]``; every such frequency is at least 1, so every in-range symbol is
codable, and the row sums to exactly ``2**PRECISION``.  Each row becomes a constriction
``Categorical(freqs / 2**PRECISION, perfect=False)`` (float64, exact), which constriction
re-quantizes deterministically to its own 24-bit fixed point.  A row of length 1 has a
certain symbol and is not coded at all (constriction rejects one-symbol models).  Channels
are coded in order, each channel's ``H * W`` symbols in C order, with the channel's
prepared model (built once per :class:`EntropyTables`, on first use, and cached).

**The constriction version is part of the format**: its 24-bit re-quantization and its
coder arithmetic must be identical on both sides.  Pin it to one minor version
(``constriction>=0.5,<0.6``); another version is allowed only once the golden-bytes test
(``tests/test_entropy_codec.py``) passes unchanged with it.

Canonical payload
-----------------
The coder is constriction's range coder (``stream.queue``: 32-bit words, 64-bit state).
Its words are written most significant byte first, so the payload reads as one binary
fraction; the decoder pads it with zero bytes to a multiple of 4 and reads ``>u4`` words
(constriction reads missing words as zero).  Every fraction in the coder's final interval
decodes to the same symbols, so instead of constriction's terminating words the encoder
computes that interval from the coder's state (``RangeEncoder.pos()``) and sends the
value in it with the most trailing zero bits, minus its trailing zero bytes.  No shorter
byte string decodes to the same symbols, that value is unique in the interval, and the
payload never ends with a zero byte.  The encoder verifies the result by decoding it (one
decode, about 40% of the encode time) and raises ``RuntimeError`` instead of
returning bytes that do not decode (never seen in ~290,000 randomized cases).  When the
interval contains 0 (every symbol is the first column of its row) the payload is empty.

Measured on the benchmark's tables (``bench/codec.py``: 8 discretized-Laplace rows of 16
symbols, 2.29 bits of entropy per symbol), 300 messages each, mean bytes:

==========  ===========  =====================  =========  ==========  =================
shape       information  range coder, words     LE trim    canonical   ANS words / trim
==========  ===========  =====================  =========  ==========  =================
(2, 7, 7)   24.89        26.99                  26.87      25.21       29.51 / 27.90
(4, 7, 7)   59.41        61.47                  61.38      59.72       63.77 / 62.32
(8, 7, 7)   112.21       114.21                 114.11     112.49      116.68 / 115.21
==========  ===========  =====================  =========  ==========  =================

"LE trim" is constriction's words written little-endian and trimmed of trailing bytes
while they still decode: it saves only 0.1 byte, because the trimmed byte is the *most*
significant byte of the last word.  The canonical payload saves 1.7-1.8 bytes over the
words and is 0.3 bytes over the information content on average (at most one byte over
per message, measured).  constriction's ANS coder (``stream.stack.AnsCoder``) carries its
final state: even trimmed it is 2.6-2.7 bytes larger than the canonical range-coder
payload on these short messages, so the range coder is used.  Coding each channel's run
with a per-row model gives the same bytes as constriction's model family with a
``(k*H*W, L)`` probability array and is faster (for ``(8, 7, 7)``: encode 7-8 vs 9
microseconds, decode 9-11 vs 16), so the per-row models are used.  The whole
:func:`encode` and :func:`decode` take about 33 microseconds each per ``(8, 7, 7)``
sample on the 2-core development machine (``bench/codec.py``, under load).

Decoding and its guarantees
---------------------------
:func:`decode` raises only :class:`tandem.codec.CodecError`: for empty data, a first byte
whose top two bits are not ``10``, a bad ``shape`` (not three positive ints, ``k > C``,
more than :data:`tandem.codec.MAX_ELEMENTS` symbols), a payload longer than
:func:`payload_cap`, data constriction's decoder reports as invalid, and a payload that is
not canonical.  The cap is ``2*N + N//1024 + 8`` bytes for ``N = k*H*W`` symbols: a
symbol costs at most ``PRECISION`` bits plus the coder's rounding loss (below 0.006 bits:
constriction's scale is ``range >> 24`` with ``range >= 2**32``), so no canonical payload
of in-range symbols reaches it; the ``N//1024`` term is that loss, which ``2*N + 8``
alone would not cover for large ``N``.  Decoding decodes exactly ``N`` symbols whatever
the payload (bounded work; memory proportional to ``N`` and to the capped payload), and
every decoded symbol lies in its row's range by construction.

After decoding, the symbols are re-encoded (about 12 of the 33 microseconds) and the
payload must equal their canonical encoding byte for byte: decode accepts exactly the
encoder's outputs, and ``encode(decode(data), tables, point_of(data)) == data`` for every
accepted ``data``.  What that catches, measured on ``(8, 7, 7)`` messages of the
benchmark's tables (share of damaged messages still accepted):

* bytes appended to a real payload: always rejected when they are zeros (the same
  symbols' canonical payload is shorter), 0.3% accepted for 1-4 random bytes;
* decoding with a smaller shape than encoded: 0.1% accepted (the rest is trailing data).

What it does not catch: a range decoder maps *any* bytes to some symbols, and a payload
that is short for its symbols ends in implicit zeros, which are canonical.  So a
truncated payload is accepted 97% of the time, a single bit flip 54%, random bytes of
the right length 48%, a larger shape 97%, and similar tables (another seed of the same
family) 94%, each time decoding to *other* in-range symbols.  The payload carries no
checksum: integrity against corruption is the transport's job, and the shape and tables
must come from the bundle.  The point in the header is not checked against the tables either: the
caller picks the tables with :func:`point_of`, and a point it has no tables for is its
error to raise.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import constriction
import numpy as np

from tandem.codec import INTERNAL_ERROR_PREFIX, MAX_ELEMENTS, CodecError

__all__ = [
    "HEADER_BYTES",
    "MAX_POINTS",
    "MAX_TABLE_LENGTH",
    "MAX_WIDTHS",
    "PRECISION",
    "EntropyTables",
    "decode",
    "encode",
    "header_byte",
    "is_v2",
    "payload_cap",
    "point_of",
    "width_index_of",
]

PRECISION: Final = 16
"""Each table row's frequencies sum to ``1 << PRECISION``."""

MAX_TABLE_LENGTH: Final = 1 << 12
"""Longest table row (alphabet size of one channel) accepted."""

MAX_POINTS: Final = 8
"""Operating points addressable by the header's three low bits."""

MAX_WIDTHS: Final = 8
"""Widths addressable by the header's middle three bits."""

HEADER_BYTES: Final = 1
"""Bytes before the payload."""

_TAG: Final = 0x80
_TAG_MASK: Final = 0xC0
_TOTAL: Final = 1 << PRECISION
_WORD_BITS: Final = 32
_INT32_MAX: Final = (1 << 31) - 1

_Categorical = constriction.stream.model.Categorical
_RangeEncoder = constriction.stream.queue.RangeEncoder
_RangeDecoder = constriction.stream.queue.RangeDecoder


@dataclass(frozen=True, eq=False)
class EntropyTables:
    """Quantized priors of one operating point: one row per bottleneck channel.

    Attributes:
        freqs: uint32 ``(C, L)``; row ``c`` has ``freqs[c, :length[c]] >= 1`` summing to
            exactly ``1 << PRECISION`` and zeros after.
        offset: int32 ``(C,)``, the symbol value of column 0 of row ``c``.
        length: int32 ``(C,)``, each in ``1..L``.

    The arrays are copied and made read-only, so the prepared constriction models (built
    on first use and cached) always match them.
    """

    freqs: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    # One prepared model per row (None for a length-1 row); built on first use.  Two threads
    # racing here both build equal lists and one wins: harmless.
    _models: list[Any] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        freqs = _checked_array(self.freqs, "freqs", np.uint32, 2)
        offset = _checked_array(self.offset, "offset", np.int32, 1)
        length = _checked_array(self.length, "length", np.int32, 1)
        c, width = freqs.shape
        if c < 1:
            raise ValueError("tables need at least one row (channel)")
        if not 1 <= width <= MAX_TABLE_LENGTH:
            raise ValueError(f"table width {width} outside 1..{MAX_TABLE_LENGTH}")
        if offset.shape != (c,) or length.shape != (c,):
            raise ValueError(
                f"offset {offset.shape} and length {length.shape} must both be ({c},) "
                f"for freqs {freqs.shape}"
            )
        bad = np.flatnonzero((length < 1) | (length > width))
        if bad.size:
            raise ValueError(f"length[{bad[0]}] = {length[bad[0]]} outside 1..{width}")
        top = offset.astype(np.int64) + length.astype(np.int64) - 1
        bad = np.flatnonzero(top > _INT32_MAX)
        if bad.size:
            raise ValueError(f"row {bad[0]}: offset + length - 1 exceeds the int32 range")
        inside = np.arange(width)[None, :] < length[:, None]
        bad = np.flatnonzero((inside & (freqs == 0)).any(axis=1))
        if bad.size:
            raise ValueError(f"row {bad[0]} has a zero frequency within its length")
        bad = np.flatnonzero((~inside & (freqs != 0)).any(axis=1))
        if bad.size:
            raise ValueError(f"row {bad[0]} has a non-zero frequency past its length")
        sums = freqs.sum(axis=1, dtype=np.uint64)
        bad = np.flatnonzero(sums != _TOTAL)
        if bad.size:
            raise ValueError(f"row {bad[0]} sums to {sums[bad[0]]}, not {_TOTAL}")
        object.__setattr__(self, "freqs", freqs)
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "length", length)

    def __getstate__(self) -> dict[str, Any]:
        # constriction models do not pickle; a copy (another process) rebuilds them.
        state = dict(self.__dict__)
        state["_models"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name in ("freqs", "offset", "length"):
            getattr(self, name).setflags(write=False)

    @property
    def channels(self) -> int:
        """Number of rows ``C``."""
        return int(self.freqs.shape[0])

    def models(self) -> list[Any]:
        """The prepared constriction model of each row (``None`` for a length-1 row)."""
        models = self._models
        if models is None:
            models = [
                None if n == 1 else _Categorical(row[:n].astype(np.float64) / _TOTAL, perfect=False)
                for row, n in zip(self.freqs, self.length.tolist(), strict=True)
            ]
            object.__setattr__(self, "_models", models)
        return models


def _checked_array(value: Any, name: str, dtype: type[np.generic], ndim: int) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(value).__name__}")
    if value.dtype != dtype:
        raise ValueError(f"{name} must have dtype {np.dtype(dtype)}, got {value.dtype}")
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {value.shape}")
    out = np.array(value, dtype=dtype, order="C", copy=True)
    out.setflags(write=False)
    return out


def payload_cap(n_symbols: int) -> int:
    """Most payload bytes :func:`decode` accepts for ``n_symbols`` symbols (header excluded).

    No symbol costs more than ``PRECISION`` bits plus a rounding loss below 0.006 bits,
    so no canonical payload reaches this length.
    """
    return 2 * n_symbols + n_symbols // 1024 + 8


# ----------------------------------------------------------------------------- header


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


def header_byte(point: int, width_index: int) -> int:
    """The header of a v2 message from ``point`` and ``width_index``; ValueError if either
    is out of range."""
    limits = (("point", point, MAX_POINTS), ("width index", width_index, MAX_WIDTHS))
    for name, value, limit in limits:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an int, got {type(value).__name__}")
        if not 0 <= value < limit:
            raise ValueError(f"{name} {value} outside 0..{limit - 1}")
    return _TAG | int(width_index) << 3 | int(point)


def _header(data: bytes | bytearray | memoryview) -> int:
    buf = _buffer(data)
    if not buf:
        raise CodecError("empty message")
    if buf[0] & _TAG_MASK != _TAG:
        raise CodecError(f"not a v2 message: first byte 0x{buf[0]:02x}")
    return int(buf[0])


def point_of(data: bytes | bytearray | memoryview) -> int:
    """The operating point named by the header of a v2 message.

    Raises:
        CodecError: for empty data or a first byte whose top two bits are not ``10``.
    """
    return _header(data) & 0x07


def width_index_of(data: bytes | bytearray | memoryview) -> int:
    """The sender's width, as an index among the bundle's sorted widths (see
    :func:`point_of` for the errors)."""
    return _header(data) >> 3 & 0x07


def is_v2(data: Any) -> bool:
    """Whether ``data`` starts like a v2 message (top bits ``10``); v1 starts with 0xEC."""
    try:
        buf = _buffer(data)
    except CodecError:
        return False
    return bool(buf) and buf[0] & _TAG_MASK == _TAG


# ----------------------------------------------------------------------------- coding


def _encode_runs(runs: Sequence[np.ndarray] | np.ndarray, models: list[Any]) -> bytes:
    """Range-code each channel's run of column indices and return the canonical payload."""
    enc = _RangeEncoder()
    coded = False
    for run, model in zip(runs, models, strict=False):
        if model is not None:
            enc.encode(run, model)
            coded = True
    if not coded:
        return b""
    words = np.asarray(enc.get_compressed(), dtype=np.uint32)
    prefix_words, (lower, span) = enc.pos()
    return _canonical(words, int(prefix_words), int(lower), int(span))


def _canonical(words: np.ndarray, prefix_words: int, lower: int, span: int) -> bytes:
    """The shortest payload inside the encoder's final interval.

    ``words`` is constriction's sealed output: ``prefix_words`` words written so far (any
    carry into pending words already applied by the seal) and then the point
    ``lower + 2**32 - 1`` with its low word cleared (one word, or two if the second is 0).
    As one big-endian integer of ``prefix_words + 2`` words, that output is ``lower``
    shifted up by less than a word; the interval is ``[low, low + span)``.
    """
    if words.size not in (prefix_words + 1, prefix_words + 2):
        raise RuntimeError(f"unexpected range coder output: {words.size} words, {prefix_words}")
    total_bits = _WORD_BITS * (prefix_words + 2)
    full = np.zeros(prefix_words + 2, dtype=">u4")
    full[: words.size] = words
    sealed = int.from_bytes(full.tobytes(), "big")
    point = (lower + (1 << _WORD_BITS) - 1) >> _WORD_BITS << _WORD_BITS  # unwrapped
    low = sealed - (point - lower)
    high = low + span - 1  # inclusive
    # The value in [low, high] with the most trailing zero bits: above the highest bit in
    # which low and high differ they agree; below it, either low is already all zeros or
    # high with those bits cleared is the roundest value.
    if low == high:
        value = low
    else:
        b = (low ^ high).bit_length() - 1
        value = low if low & ((1 << (b + 1)) - 1) == 0 else high >> b << b
    if value == 0:
        return b""
    trailing = (value & -value).bit_length() - 1
    keep = total_bits // 8 - trailing // 8
    return value.to_bytes(total_bits // 8, "big")[:keep]


def _decode_runs(
    payload: bytes | memoryview, models: list[Any], k: int, n: int
) -> list[np.ndarray]:
    """Decode ``k`` runs of ``n`` column indices (int32) from a payload."""
    padded = bytes(payload) + b"\0" * (-len(payload) % 4)
    words = np.frombuffer(padded, dtype=">u4").astype(np.uint32)
    dec = _RangeDecoder(words)
    zeros: np.ndarray | None = None
    runs: list[np.ndarray] = []
    for c in range(k):
        model = models[c]
        if model is None:
            if zeros is None:
                zeros = np.zeros(n, dtype=np.int32)
            runs.append(zeros)
        else:
            try:
                run = dec.decode(model, n)
            except Exception as exc:  # constriction raises AssertionError for invalid data
                raise CodecError(f"range decoder rejected the payload: {exc}") from exc
            runs.append(np.asarray(run, dtype=np.int32))
    return runs


def encode(symbols: np.ndarray, tables: EntropyTables, point: int, width_index: int = 0) -> bytes:
    """Range-code integer symbols against the first ``k`` rows of ``tables``.

    Args:
        symbols: integer array of shape ``(k, H, W)``, ``1 <= k <= C``; every
            ``symbols[c]`` must lie in ``[offset[c], offset[c] + length[c])``.
        tables: the operating point's tables.
        point: the operating point, ``0..MAX_POINTS-1``, written to the header.
        width_index: the sender's width among the bundle's sorted widths,
            ``0..MAX_WIDTHS-1``, written to the header.

    Returns:
        :func:`header_byte` followed by the canonical payload (see the module docstring).

    Raises:
        ValueError: for a non-integer or misshapen array, ``k > C``, an out-of-range
            symbol (the caller clamps; the codec never does) or a bad point.
    """
    if not isinstance(tables, EntropyTables):
        raise ValueError(f"tables must be EntropyTables, got {type(tables).__name__}")
    header = header_byte(point, width_index)
    arr = np.asarray(symbols)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"symbols must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != 3 or 0 in arr.shape:
        raise ValueError(f"symbols must have a non-empty shape (k, H, W), got {arr.shape}")
    k = arr.shape[0]
    if k > tables.channels:
        raise ValueError(f"{k} channels of symbols but the tables have {tables.channels} rows")
    flat = arr.reshape(k, -1)
    if flat.dtype == np.uint64 and int(flat.max()) > np.iinfo(np.int64).max:
        raise ValueError("symbol value exceeds the int64 range")
    # Column indices.  Viewed as unsigned, a negative index is huge, so one comparison
    # checks both ends; a difference that wraps (symbols near the int64 limits) still
    # lands far outside [0, length).
    cols = flat.astype(np.int64) - tables.offset[:k, None]
    outside = cols.view(np.uint64) >= tables.length[:k, None].astype(np.uint64)
    if outside.any():
        c = int(np.flatnonzero(outside.any(axis=1))[0])
        lo = int(tables.offset[c])
        hi = lo + int(tables.length[c]) - 1
        raise ValueError(
            f"channel {c}: symbols in [{int(flat[c].min())}, {int(flat[c].max())}] "
            f"outside the table range [{lo}, {hi}]"
        )
    cols32 = cols.astype(np.int32)
    models = tables.models()
    payload = _encode_runs(cols32, models)
    # Checked by decoding: the payload is computed from the coder's state, not taken from
    # constriction, so prove it decodes before sending it.
    try:
        back = _decode_runs(payload, models, k, flat.shape[1])
    except CodecError as exc:
        raise RuntimeError(f"entropy codec: the payload does not decode: {exc}") from exc
    if b"".join(run.tobytes() for run in back) != cols32.tobytes():
        raise RuntimeError("entropy codec: the payload does not decode to its symbols")
    return bytes((header,)) + payload


def _check_shape(shape: Any, tables: EntropyTables) -> tuple[int, int, int]:
    if not isinstance(shape, tuple | list) or len(shape) != 3:
        raise CodecError(f"shape must be a (k, H, W) tuple, got {shape!r}")
    if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) for d in shape):
        raise CodecError(f"shape must hold ints, got {shape!r}")
    k, h, w = (int(d) for d in shape)
    if min(k, h, w) < 1:
        raise CodecError(f"shape {shape!r} has a non-positive dimension")
    if k > tables.channels:
        raise CodecError(f"shape asks for {k} channels but the tables have {tables.channels}")
    if k * h * w > MAX_ELEMENTS:
        raise CodecError(f"shape {shape!r} exceeds {MAX_ELEMENTS} symbols")
    return k, h, w


def decode(
    data: bytes | bytearray | memoryview, tables: EntropyTables, shape: tuple[int, int, int]
) -> np.ndarray:
    """Decode a v2 message into int32 symbols of exactly ``shape``.

    Args:
        data: the message (header and payload).
        tables: the tables of the point the message names (see :func:`point_of`); the
            point itself is not checked against them.
        shape: ``(k, H, W)`` from the receiver's bundle, ``k <= C``; the only source of
            the symbol count.

    Returns:
        A new int32 array of ``shape``; ``result[c]`` lies in
        ``[offset[c], offset[c] + length[c])``.

    Raises:
        CodecError: for empty data, a header without the v2 bits, a bad shape, a payload longer
            than :func:`payload_cap`, one constriction's decoder reports as invalid, or
            one that is not the canonical encoding of the symbols it decodes to; no other
            exception escapes.
    """
    with _codec_errors_only():
        if not isinstance(tables, EntropyTables):
            raise CodecError(f"tables must be EntropyTables, got {type(tables).__name__}")
        buf = _buffer(data)
        point_of(buf)
        k, h, w = _check_shape(shape, tables)
        n = h * w
        payload = buf[HEADER_BYTES:]
        cap = payload_cap(k * n)
        if len(payload) > cap:
            raise CodecError(f"payload of {len(payload)} bytes exceeds the cap of {cap}")
        models = tables.models()
        runs = _decode_runs(payload, models, k, n)
        if _encode_runs(runs, models) != payload:
            raise CodecError(
                "payload is not the canonical encoding of the symbols it decodes to "
                "(damaged, padded or truncated data, or other tables)"
            )
        out = np.concatenate(runs).reshape(k, n)
        out += tables.offset[:k, None]
        return out.reshape(k, h, w)


@contextmanager
def _codec_errors_only() -> Iterator[None]:
    """Turn any escaped exception into a CodecError: validation should make this unreachable."""
    try:
        yield
    except CodecError:
        raise
    except MemoryError as exc:
        raise CodecError("out of memory while decoding") from exc
    except Exception as exc:
        raise CodecError(f"{INTERNAL_ERROR_PREFIX}: {type(exc).__name__}: {exc}") from exc
