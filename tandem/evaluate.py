"""Measuring a bundle: accuracy against bytes on the wire, next to lossless baselines.

Every point is measured through the real codec, one payload per sample, decoded again
before the tail sees it: the bytes reported are the bytes a device would send, header
included.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard
from PIL import Image

from tandem.bundle import HeadRunner, TailRunner, load_full, read_manifest
from tandem.data import Split, normalize
from tandem.train import accuracy, batched_outputs

Progress = Callable[[int], object]


@dataclass(frozen=True)
class Point:
    """Accuracy and mean payload size at one (width, bits) setting."""

    width: float
    bits: int
    accuracy: float
    bytes_per_sample: float


def _png_bytes(image: np.ndarray) -> int:
    buf = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(
        buf, format="PNG", optimize=True
    )
    return buf.tell()


def input_baselines(x: np.ndarray) -> dict[str, float]:
    """Mean bytes per sample of the raw uint8 input, of PNG and of zstd level 19."""
    zstd19 = zstandard.ZstdCompressor(level=19)
    return {
        "raw": float(x[0].nbytes),
        "png": float(np.mean([_png_bytes(img) for img in x])),
        "zstd19": float(np.mean([len(zstd19.compress(img.tobytes())) for img in x])),
    }


def measure_points(
    head: HeadRunner,
    tail: TailRunner,
    split: Split,
    bits_list: list[int],
    *,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> list[Point]:
    """Accuracy and mean payload bytes for every trained width and each of ``bits_list``."""
    points = []
    for width in head.manifest.bottleneck.widths:
        z = head.features(split.x, width)
        for bits in bits_list:
            payloads = head.pack(z, bits)
            logits = np.concatenate(
                [
                    tail.infer(payloads[i : i + batch_size])
                    for i in range(0, len(payloads), batch_size)
                ]
            )
            acc = accuracy(logits, split.y)
            size = float(np.mean([len(p) for p in payloads]))
            points.append(Point(width, bits, acc, size))
            if progress:
                progress(1)
    return points


def evaluate_bundle(
    bundle: Path, split: Split, bits_list: list[int], progress: Progress | None = None
) -> dict[str, Any]:
    """The full ``tandem eval`` report for a bundle on a test split."""
    manifest = read_manifest(bundle)
    head, tail = HeadRunner.from_bundle(bundle), TailRunner.from_bundle(bundle)
    if tuple(split.x.shape[1:]) != tuple(manifest.input.shape):
        raise ValueError(
            f"the data's inputs are {split.x.shape[1:]} but the bundle takes {manifest.input.shape}"
        )
    teacher = load_full(bundle)
    teacher_acc = manifest.teacher_accuracy
    if teacher is not None:
        x = normalize(split.x, manifest.input.mean, manifest.input.std)
        teacher_acc = accuracy(batched_outputs(teacher, x), split.y)
    points = measure_points(head, tail, split, bits_list, progress=progress)
    return {
        "bundle": str(bundle),
        "samples": len(split),
        "teacher": {"accuracy": teacher_acc, "measured": teacher is not None},
        "baselines": input_baselines(split.x),
        "points": [asdict(p) for p in points],
        # Both counts were measured with FlopCounterMode when the bundle was built.
        "head_flops_share": manifest.head_flops / manifest.teacher_flops,
    }
