"""What a user would send without Tandem: the input image through a standard codec.

Each point is the teacher's top-1 accuracy on inputs that went through the codec and back
(Pillow, as a device would encode them), with their mean size in bytes: the curve a split
point has to beat. JPEG and WebP at a range of qualities (lossy, so accuracy falls with the
bytes), PNG once (lossless, optimized: its accuracy is the teacher's).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from torch import nn

from tandem.data import Split, normalize
from tandem.train import accuracy, batched_outputs

QUALITIES: dict[str, tuple[int | None, ...]] = {
    "jpeg": (5, 10, 25, 50, 75, 80, 85, 90),
    "webp": (5, 10, 25, 50, 75, 80, 85, 90),
    "png": (None,),
}
"""The codecs and qualities measured, in the order reported. Denser from 75 to 90, where a
photograph's accuracy comes within a point of the teacher's: a coarse grid there would set the
equal-accuracy reference at a needlessly large input."""


@dataclass(frozen=True)
class InputPoint:
    """The teacher's accuracy on inputs sent through ``codec`` at ``quality`` (None for a
    lossless codec), and their mean encoded size."""

    codec: str
    quality: int | None
    accuracy: float
    bytes_per_sample: float


def pil_image(image: np.ndarray) -> Image.Image:
    """A uint8 ``C x H x W`` array (one or three channels) as a Pillow image."""
    return Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))


def round_trip(image: np.ndarray, codec: str, quality: int | None) -> tuple[np.ndarray, int]:
    """``image`` (uint8, C x H x W, one or three channels) encoded with ``codec`` and decoded
    again, in the same layout; and the encoded size in bytes."""
    grey = image.shape[0] == 1
    pil = pil_image(image)
    buf = io.BytesIO()
    if codec == "png":
        pil.save(buf, format="PNG", optimize=True)
    elif codec == "jpeg":
        pil.save(buf, format="JPEG", quality=quality)
    elif codec == "webp":
        pil.save(buf, format="WEBP", quality=quality, method=6)
    else:
        raise ValueError(f"unknown input codec {codec!r}: expected one of {sorted(QUALITIES)}")
    size = buf.tell()
    buf.seek(0)
    with Image.open(buf) as decoded:
        pixels = np.asarray(decoded.convert("L" if grey else "RGB"))
    return (pixels[None] if grey else pixels.transpose(2, 0, 1)), size


def measure_input_codecs(
    teacher: nn.Module,
    split: Split,
    mean: list[float],
    std: list[float],
    progress: Callable[[int], object] | None = None,
) -> list[InputPoint]:
    """The teacher's accuracy and the mean bytes per sample at every codec and quality of
    :data:`QUALITIES`, over ``split`` (normalised with ``mean`` and ``std`` as the teacher
    was trained)."""
    points = []
    for codec, qualities in QUALITIES.items():
        for quality in qualities:
            coded = [round_trip(image, codec, quality) for image in split.x]
            x = np.stack([pixels for pixels, _ in coded])
            logits = batched_outputs(teacher, normalize(x, mean, std))
            size = float(np.mean([n for _, n in coded]))
            points.append(InputPoint(codec, quality, accuracy(logits, split.y), size))
            if progress:
                progress(1)
    return points


def count() -> int:
    """How many points :func:`measure_input_codecs` measures (for a progress bar)."""
    return sum(len(q) for q in QUALITIES.values())
