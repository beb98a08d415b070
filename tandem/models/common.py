"""Helpers shared by the model constructors."""

from __future__ import annotations

from torch import nn


def check_common_args(num_classes: int, in_channels: int, width: float) -> None:
    """Raise ``ValueError`` for arguments no architecture can be built from."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")


def init_conv_bn(module: nn.Module) -> None:
    """Kaiming-initialise every convolution and reset every batch norm to identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            # fan_out keeps activation variance stable through the ReLU stacks.
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
