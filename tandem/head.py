"""The device side of a bundle, whatever runs its encoder: inputs checked, features coded.

:class:`HeadCodec` holds everything the device does besides computing the features: the
input and width checks, and the two codecs (quantise+zstd, and range coding at a rate
point). A runtime supplies :meth:`HeadCodec.features`: PyTorch
(:class:`tandem.bundle.HeadRunner`) or ONNX Runtime (:class:`tandem.onnx_head.OnnxHead`).
Nothing here imports PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tandem import codec
from tandem.entropy_points import RatePoint
from tandem.manifest import Manifest


class HeadCodec:
    """Uint8 inputs to encoded bottleneck payloads, given a runtime's :meth:`features`."""

    def __init__(self, manifest: Manifest, points: Sequence[RatePoint] = ()) -> None:
        self.manifest = manifest
        self.points = list(points)

    def features(self, x: np.ndarray, width: float) -> np.ndarray:
        """The float32 bottleneck tensors for uint8 inputs ``(N, C, H, W)`` at ``width``."""
        raise NotImplementedError

    def check_input(self, x: np.ndarray) -> None:
        """Raise ValueError unless ``x`` is uint8 ``(N, *input shape)`` for this bundle."""
        expected = tuple(self.manifest.input.shape)
        if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected uint8 inputs of shape (N, {expected}), got {x.dtype} {x.shape}"
            )

    def check_width(self, width: float) -> None:
        """Raise ValueError unless ``width`` is one the bottleneck was trained for."""
        if width not in self.manifest.bottleneck.widths:
            raise ValueError(
                f"width {width} not trained; choose from {self.manifest.bottleneck.widths}"
            )

    def pack(self, z: np.ndarray, bits: int) -> list[bytes]:
        """Encode each sample's bottleneck tensor into one wire payload."""
        compress = self.manifest.codec.compress
        return codec.encode_batch(z, bits, compress=compress)

    def encode(self, x: np.ndarray, width: float, bits: int | None = None) -> list[bytes]:
        """Payloads for uint8 inputs, one per sample (``bits`` defaults to the bundle's)."""
        return self.pack(
            self.features(x, width), self.manifest.codec.bits if bits is None else bits
        )

    def rate_point(self, point: int) -> RatePoint:
        """Rate point ``point`` of the bundle's entropy model; ValueError if it has none."""
        if not 0 <= point < len(self.points):
            raise ValueError(f"rate point {point} not in this bundle ({len(self.points)} points)")
        return self.points[point]

    def pack_entropy(self, z: np.ndarray, width: float, point: int) -> list[bytes]:
        """Range-code each sample's bottleneck tensor, sent at ``width``, at rate point
        ``point``."""
        rate = self.rate_point(point)
        index = self.manifest.bottleneck.widths.index(width)
        return [rate.encode(sample, point, index) for sample in z]

    def encode_entropy(self, x: np.ndarray, width: float, point: int) -> list[bytes]:
        """Entropy-coded payloads for uint8 inputs at ``width`` and rate point ``point``."""
        return self.pack_entropy(self.features(x, width), width, point)
