"""Measuring a bundle: accuracy against bytes on the wire, next to lossless baselines and
the teacher on inputs sent through JPEG, WebP and PNG (:mod:`tandem.input_codecs`).

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
import torch
import zstandard

from tandem.bundle import HeadRunner, TailRunner, load_full, read_manifest
from tandem.data import Split, normalize
from tandem.entropy_points import information_bits
from tandem.equal_accuracy import DEFAULT_WITHIN, at_equal_accuracy
from tandem.input_codecs import InputPoint, measure_input_codecs, pil_image
from tandem.train import accuracy, batched_outputs

Progress = Callable[[int], object]


@dataclass(frozen=True)
class Point:
    """Accuracy and mean payload size at one operating point: a width with the quantise+zstd
    codec at ``bits``, or with rate point ``point`` of the entropy model (see
    :class:`tandem.bundle.TablePoint`)."""

    width: float
    accuracy: float
    bytes_per_sample: float
    codec: str = "quantize"
    bits: int | None = None
    point: int | None = None
    beta: float | None = None
    entropy_bits: float | None = None


def _image_bytes(image: np.ndarray, **save: Any) -> int:
    buf = io.BytesIO()
    pil_image(image).save(buf, **save)
    return buf.tell()


def input_baselines(x: np.ndarray) -> dict[str, float]:
    """Mean bytes per sample of the raw uint8 input and of three lossless codecs for it: PNG
    (optimized), zstd level 19 and WebP lossless (Pillow, best effort)."""
    zstd19 = zstandard.ZstdCompressor(level=19)
    return {
        "raw": float(x[0].nbytes),
        "png": float(np.mean([_image_bytes(img, format="PNG", optimize=True) for img in x])),
        "zstd19": float(np.mean([len(zstd19.compress(img.tobytes())) for img in x])),
        "webp_lossless": float(
            np.mean([_image_bytes(img, format="WEBP", lossless=True, method=6) for img in x])
        ),
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
    """Accuracy and mean payload bytes for every trained width with each of ``bits_list``
    (the quantise+zstd codec) and with each of the bundle's rate points."""
    points = []
    betas = head.manifest.entropy.betas if head.manifest.entropy is not None else []
    for width in head.manifest.bottleneck.widths:
        z = head.features(split.x, width)
        for bits in bits_list:
            payloads = head.pack(z, bits)
            acc, size = _measured(tail, payloads, split.y, width, batch_size)
            points.append(Point(width, acc, size, bits=bits))
            if progress:
                progress(1)
        for index, beta in enumerate(betas):
            rate = head.rate_point(index)
            payloads = head.pack_entropy(z, width, index)
            acc, size = _measured(tail, payloads, split.y, width, batch_size)
            estimate = float(np.mean([information_bits(rate, rate.quantize(s)) for s in z]))
            points.append(
                Point(width, acc, size, "entropy", point=index, beta=beta, entropy_bits=estimate)
            )
            if progress:
                progress(1)
    return points


def _measured(
    tail: TailRunner, payloads: list[bytes], labels: np.ndarray, width: float, batch_size: int
) -> tuple[float, float]:
    """Accuracy of the tail on ``payloads``, and their mean size in bytes."""
    logits = np.concatenate(
        [
            tail.infer(payloads[i : i + batch_size], width)
            for i in range(0, len(payloads), batch_size)
        ]
    )
    return accuracy(logits, labels), float(np.mean([len(p) for p in payloads]))


def evaluate_bundle(
    bundle: Path,
    split: Split,
    bits_list: list[int],
    progress: Progress | None = None,
    device: torch.device | None = None,
    within: float = DEFAULT_WITHIN,
) -> dict[str, Any]:
    """The full ``tandem eval`` report for a bundle on a test split.

    The head runs on the CPU, as on a device; decoder, tail and teacher on ``device``
    (default: the CPU). When the bundle carries its teacher, ``equal_accuracy`` compares the
    cheapest bottleneck and input-codec points within ``within`` of the teacher's accuracy
    (:mod:`tandem.equal_accuracy`)."""
    manifest = read_manifest(bundle)
    head, tail = HeadRunner.from_bundle(bundle), TailRunner.from_bundle(bundle, device=device)
    if tuple(split.x.shape[1:]) != tuple(manifest.input.shape):
        raise ValueError(
            f"the data's inputs are {split.x.shape[1:]} but the bundle takes {manifest.input.shape}"
        )
    teacher = load_full(bundle)
    teacher_acc = manifest.teacher_accuracy
    points = measure_points(head, tail, split, bits_list, progress=progress)
    inputs: list[InputPoint] = []
    compared = None  # both routes need the teacher measured on this split
    if teacher is not None:
        teacher = teacher.to(tail.device)
        mean, std = manifest.input.mean, manifest.input.std
        measured = accuracy(batched_outputs(teacher, normalize(split.x, mean, std)), split.y)
        inputs = measure_input_codecs(teacher, split, mean, std, progress)
        compared = at_equal_accuracy(measured, points, inputs, within).to_dict()
        teacher_acc = measured
    return {
        "bundle": str(bundle),
        "samples": len(split),
        "teacher": {"accuracy": teacher_acc, "measured": teacher is not None},
        "baselines": input_baselines(split.x),
        "points": [asdict(p) for p in points],
        # Sending the input instead; empty when the bundle carries no teacher to measure.
        "input_codecs": [asdict(p) for p in inputs],
        "equal_accuracy": compared,
        # Both counts were measured with FlopCounterMode when the bundle was built.
        "head_flops_share": manifest.head_flops / manifest.teacher_flops,
    }
