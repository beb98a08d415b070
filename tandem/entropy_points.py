"""A bundle's exported rate points: what both sides need to code symbols, and nothing more.

Each point is a per-channel gain, the prior's medians and its quantized tables
(:class:`~tandem.entropy_codec.EntropyTables`). The device quantizes its float bottleneck
with them and range-codes the symbols; the cloud decodes the symbols and dequantizes. No
torch here: a head running without PyTorch uses the same code.

File ``entropy.safetensors`` holds, for point ``i``: ``p{i}.gain`` and ``p{i}.median``
(float32, C), ``p{i}.freqs`` (uint32, C x L), ``p{i}.offset`` and ``p{i}.length`` (int32, C).
Its sha256 is in the manifest, like every weight file's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save_file

from tandem import entropy_codec
from tandem.entropy_codec import EntropyTables

ENTROPY_FILE = "entropy.safetensors"
_FIELDS = ("gain", "median", "freqs", "offset", "length")


@dataclass(frozen=True, eq=False)
class RatePoint:
    """One operating point of the entropy-coded bottleneck."""

    gain: np.ndarray  # float32 (C,): the encoder's output is multiplied by it before rounding
    median: np.ndarray  # float32 (C,): symbols are relative to the prior's medians
    tables: EntropyTables

    def __post_init__(self) -> None:
        """Check the arrays agree with the tables; a ValueError says which does not."""
        c = len(self.tables.offset)
        for name in ("gain", "median"):
            value = getattr(self, name)
            if value.dtype != np.float32 or value.shape != (c,):
                raise ValueError(
                    f"{name} must be float32 of shape ({c},), got {value.dtype} {value.shape}"
                )
            if not np.all(np.isfinite(value)):
                raise ValueError(f"{name} has non-finite values")
        if not np.all(self.gain > 0):
            raise ValueError("gains must be positive")

    def quantize(self, z: np.ndarray) -> np.ndarray:
        """Integer symbols for one sample's float bottleneck ``z`` (k, H, W), clamped into
        the tables (whose edge bins carry the mass beyond them)."""
        k = z.shape[0]
        lo = self.tables.offset[:k, None, None]
        hi = lo + self.tables.length[:k, None, None] - 1
        y = z.astype(np.float32) * self.gain[:k, None, None] - self.median[:k, None, None]
        return np.clip(np.rint(y), lo, hi).astype(np.int32)

    def dequantize(self, symbols: np.ndarray) -> np.ndarray:
        """The decoder's float input for symbols (k, H, W) or (N, k, H, W)."""
        k = symbols.shape[-3]
        gain, median = self.gain[:k, None, None], self.median[:k, None, None]
        return ((symbols.astype(np.float32) + median) / gain).astype(np.float32)

    def encode(self, z: np.ndarray, index: int, width_index: int) -> bytes:
        """One sample's wire payload at this point (``index`` is its number in the bundle,
        ``width_index`` the sender's width among the bundle's sorted widths)."""
        return entropy_codec.encode(self.quantize(z), self.tables, index, width_index)

    def decode(self, data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        """Float features of one payload whose shape the receiver knows from the bundle."""
        return self.dequantize(entropy_codec.decode(data, self.tables, shape))


def save_points(points: Sequence[RatePoint], path: Path) -> None:
    """Write ``points`` to a safetensors file."""
    arrays: dict[str, np.ndarray] = {}
    for i, p in enumerate(points):
        t = p.tables
        values = (p.gain, p.median, t.freqs, t.offset, t.length)
        for name, value in zip(_FIELDS, values, strict=True):
            arrays[f"p{i}.{name}"] = np.ascontiguousarray(value)
    save_file(arrays, str(path))


def points_from_bytes(data: bytes, count: int) -> list[RatePoint]:
    """The ``count`` points of an ``entropy.safetensors`` file's bytes (already hash-checked);
    a ValueError names what is missing or malformed."""
    try:
        arrays = load_arrays(data)
    except Exception as exc:  # safetensors raises its own error type for a malformed file
        raise ValueError(f"unreadable: {exc}") from None
    expected = {f"p{i}.{name}" for i in range(count) for name in _FIELDS}
    if set(arrays) != expected:
        raise ValueError(f"holds {sorted(arrays)}; expected the arrays of {count} points")
    points = []
    for i in range(count):
        gain, median, freqs, offset, length = (arrays[f"p{i}.{name}"] for name in _FIELDS)
        tables = EntropyTables(freqs, offset, length)
        points.append(RatePoint(gain, median, tables))
    return points


def information_bits(point: RatePoint, symbols: np.ndarray) -> float:
    """The bits the point's tables assign to ``symbols`` (k, H, W): ``-log2`` of each
    symbol's table probability, summed. This is the model's own estimate of a sample's
    cost; what the coder emits over it is the coder's overhead."""
    t = point.tables
    k = symbols.shape[0]
    rows = np.arange(k)[:, None, None]
    freqs = t.freqs[rows, symbols - t.offset[:k, None, None]].astype(np.float64)
    return float(-np.log2(freqs / (1 << entropy_codec.PRECISION)).sum())
