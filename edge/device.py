"""What runs on the device: the bundle's head, and its whole model as a local fallback.

Both are timed once at start-up on this device, because the split policy needs to know
what computing costs here, not on the machine the bundle was trained on.

The head runs on PyTorch (``runtime="torch"``) or on ONNX Runtime (``"onnx"``, from the
bundle's exported head): then nothing here imports PyTorch, and there is no local fallback,
since the whole model is PyTorch's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from tandem.head import HeadCodec

if TYPE_CHECKING:
    from torch import nn

Runtime = Literal["torch", "onnx"]


def _per_sample_ms(fn: Callable[[], object], batch: int, repeats: int = 3) -> float:
    fn()  # warm-up: first calls pay for allocation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)) / batch


@dataclass(frozen=True)
class Encoding:
    """How a batch is sent: a width, and either the quantise+zstd codec at ``bits`` or rate
    ``point`` of the bundle's entropy model."""

    width: float
    bits: int | None = None
    point: int | None = None


class DeviceModels:
    """The head (always, with ``adapter`` merged when given) and the full model (when the
    bundle has one, fallback is on and the runtime is PyTorch; it never takes the head
    adapter)."""

    def __init__(
        self,
        bundle: Path,
        *,
        fallback: bool,
        batch: int,
        adapter: Path | None = None,
        runtime: Runtime = "torch",
    ) -> None:
        self.head = _head(bundle, adapter, runtime)
        self.manifest = self.head.manifest
        self.full: nn.Module | None = None
        if fallback and runtime == "torch":
            from tandem.bundle import load_full

            self.full = load_full(bundle)
        self.batch = batch

    def time_head(self) -> dict[float, float]:
        """Milliseconds per sample of head + encoder at each width, at this device's batch."""
        x = np.zeros((self.batch, *self.manifest.input.shape), np.uint8)
        return {w: self._time_width(x, w) for w in self.manifest.bottleneck.widths}

    def _time_width(self, x: np.ndarray, width: float) -> float:
        return _per_sample_ms(lambda: self.head.features(x, width), self.batch)

    def time_local(self) -> float | None:
        """Milliseconds for one input through the full model, or None without one."""
        if self.full is None:
            return None
        x = np.zeros((1, *self.manifest.input.shape), np.uint8)
        return _per_sample_ms(lambda: self.predict_local(x), 1)

    def encode(self, x: np.ndarray, encoding: Encoding) -> list[bytes]:
        """Wire payloads for uint8 inputs ``(N, C, H, W)``, coded as ``encoding`` says."""
        if encoding.point is not None:
            return self.head.encode_entropy(x, encoding.width, encoding.point)
        assert encoding.bits is not None
        return self.head.encode(x, encoding.width, encoding.bits)

    def predict_local(self, x: np.ndarray) -> list[int]:
        """Predicted classes from the full model, for uint8 inputs ``(N, C, H, W)``."""
        if self.full is None:
            raise RuntimeError("this bundle has no local fallback model")
        import torch

        from tandem.data import normalize

        self.head.check_input(x)
        spec = self.manifest.input
        with torch.inference_mode():
            return self.full(normalize(x, spec.mean, spec.std)).argmax(1).tolist()


def _head(bundle: Path, adapter: Path | None, runtime: Runtime) -> HeadCodec:
    """The bundle's head on ``runtime``: only the chosen runtime's library is imported."""
    if runtime == "onnx":
        if adapter is not None:
            raise ValueError("a head adapter needs the torch runtime")
        from tandem.onnx_head import OnnxHead

        return OnnxHead.from_bundle(bundle)
    from tandem.bundle import HeadRunner

    return HeadRunner.from_bundle(bundle, adapter)
