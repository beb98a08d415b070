"""Per-client domain shifts: what makes one device's camera unlike another's.

A domain is named by a spec ``kind[:param]``; it maps uint8 images ``(N, C, H, W)`` to
uint8 images of the same shape, deterministically for a given seed:

- ``identity``: unchanged;
- ``rotate:DEG``: rotated by DEG degrees about the centre (bilinear, black fill);
- ``invert``: 255 - x, light digits on dark become dark on light;
- ``noise:SIGMA``: additive Gaussian noise, SIGMA a fraction of the full range;
- ``contrast:F``: contrast scaled by F about mid-grey (F < 1 washes the image out);
- ``shift:F``: translated right and down by a fraction F of the image size (black fill);
- ``blur:K``: a K x K box blur.

Specs are data, parsed here; nothing in them is ever imported or evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F


class DomainError(ValueError):
    """An unknown or malformed domain spec."""


def _rotate(x: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    images = torch.from_numpy(x.astype(np.float32))
    affine = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]]).expand(len(x), 2, 3)
    grid = F.affine_grid(affine, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _to_uint8(out.numpy())


def _invert(x: np.ndarray, _: float, rng: np.random.Generator) -> np.ndarray:
    return 255 - x


def _noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(x + rng.normal(0.0, sigma * 255.0, x.shape))


def _contrast(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8((x.astype(np.float32) - 127.5) * factor + 127.5)


def _shift(x: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[2:]
    dy, dx = round(fraction * h), round(fraction * w)
    out = np.zeros_like(x)
    out[:, :, dy:, dx:] = x[:, :, : h - dy, : w - dx]
    return out


def _blur(x: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    k = int(size)
    images = torch.from_numpy(x.astype(np.float32))
    padded = F.pad(images, (k // 2, (k - 1) // 2, k // 2, (k - 1) // 2), mode="replicate")
    return _to_uint8(F.avg_pool2d(padded, k, stride=1).numpy())


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


Transform = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]

# name -> (transform, default parameter, check on the parameter)
_DOMAINS: dict[str, tuple[Transform, float, Callable[[float], bool]]] = {
    "identity": (lambda x, _, __: x, 0.0, lambda p: True),
    "rotate": (_rotate, 30.0, lambda p: math.isfinite(p)),
    "invert": (_invert, 0.0, lambda p: True),
    "noise": (_noise, 0.3, lambda p: 0 <= p <= 1),
    "contrast": (_contrast, 0.3, lambda p: 0 < p <= 4),
    "shift": (_shift, 0.15, lambda p: 0 <= p < 1),
    "blur": (_blur, 3.0, lambda p: p >= 1 and p == int(p)),
}


def domain_list(specs: str) -> list[str]:
    """The domain specs of a comma-separated list, in order (blank entries skipped)."""
    return [d.strip() for d in specs.split(",") if d.strip()]


def parse_domain(spec: str) -> tuple[str, float]:
    """``(kind, parameter)`` of a domain spec; DomainError names the valid kinds."""
    kind, _, arg = spec.strip().partition(":")
    if kind not in _DOMAINS:
        raise DomainError(f"unknown domain {spec!r}; kinds are {', '.join(sorted(_DOMAINS))}")
    _, default, valid = _DOMAINS[kind]
    try:
        param = float(arg) if arg else default
    except ValueError:
        raise DomainError(f"domain {spec!r}: {arg!r} is not a number") from None
    if not valid(param):
        raise DomainError(f"domain {spec!r}: parameter {param} is out of range")
    return kind, param


def apply_domain(spec: str, x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Images ``x`` (uint8, N x C x H x W) as seen in domain ``spec``."""
    if x.dtype != np.uint8 or x.ndim != 4:
        raise DomainError(f"expected uint8 images (N, C, H, W), got {x.dtype} {x.shape}")
    kind, param = parse_domain(spec)
    if not len(x):
        return x.copy()
    return _DOMAINS[kind][0](x, param, np.random.default_rng(seed))
