"""MobileNetV2 with torchvision-compatible state-dict keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.models.common import check_common_args, init_conv_bn
from tandem.models.registry import register_model

# (expand ratio t, output channels c, repeats n, first stride s) per stage, from the paper.
_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_STEM_CHANNELS = 32
_LAST_CHANNELS = 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``).

    Rounding down is not allowed to lose more than 10% of ``value``.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNActivation(nn.Sequential):
    """Convolution, batch norm and ReLU6; children are named 0, 1, 2 as in torchvision."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        """Build the block; padding keeps the spatial size at stride 1."""
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=(kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3), project (1x1, linear), with a shortcut when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        """Build the block; an expand ratio of 1 drops the expansion convolution."""
        super().__init__()
        hidden = round(in_channels * expand_ratio)
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNActivation(in_channels, hidden, 1))
        layers += [
            ConvBNActivation(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 whose channel counts scale with ``width``.

    With ``small_input`` the stem and the first stride-2 stage use stride 1, so a 32x32 input
    reaches the head at 4x4 instead of 1x1.
    """

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        width: float = 1.0,
        small_input: bool = False,
        dropout: float = 0.2,
    ) -> None:
        """Build the network."""
        super().__init__()
        check_common_args(num_classes, in_channels, width)
        channels = make_divisible(_STEM_CHANNELS * width)
        # The last layer is never narrowed: it carries the features the classifier needs.
        last_channels = make_divisible(_LAST_CHANNELS * max(1.0, width))
        features: list[nn.Module] = [
            ConvBNActivation(in_channels, channels, 3, stride=1 if small_input else 2)
        ]
        for stage, (t, c, n, s) in enumerate(_STAGES):
            out_channels = make_divisible(c * width)
            stride = 1 if small_input and stage == 1 else s
            for i in range(n):
                features.append(
                    InvertedResidual(channels, out_channels, stride if i == 0 else 1, t)
                )
                channels = out_channels
        features.append(ConvBNActivation(channels, last_channels, 1))
        self.features = nn.Sequential(*features)
        head = nn.Linear(last_channels, num_classes)
        self.classifier = nn.Sequential(nn.Dropout(dropout), head)
        init_conv_bn(self)
        nn.init.normal_(head.weight, 0.0, 0.01)
        nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of images."""
        x = self.features(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


@register_model("mobilenet_v2")
def mobilenet_v2(
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    width: float = 1.0,
    small_input: bool = False,
    dropout: float = 0.2,
) -> MobileNetV2:
    """Build MobileNetV2."""
    return MobileNetV2(
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        small_input=small_input,
        dropout=dropout,
    )
