"""Channel counts at a width fraction: one rule for the zoo, the bottleneck and the manifest.

Kept free of PyTorch, so that a device reading a bundle's manifest does not need it.
"""

from __future__ import annotations


def scale_channels(base: int, width: float) -> int:
    """Scale a channel count by ``width``, rounding to the nearest integer of at least 1."""
    return max(1, round(base * width))


def width_channels(channels: int, width: float) -> int:
    """Number of bottleneck channels kept at a width fraction (at least one)."""
    return scale_channels(channels, width)
