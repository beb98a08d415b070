"""ResNet-18/34/50 with torchvision-compatible state-dict keys."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from tandem.models.common import check_common_args, init_conv_bn
from tandem.models.registry import register_model
from tandem.widths import scale_channels

_BASE_CHANNELS = 64


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """Return the 1x1 projection shortcut, or ``None`` when the identity fits."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (ResNet-18/34)."""

    expansion: ClassVar[int] = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        """Build a block mapping ``in_channels`` to ``planes`` channels at ``stride``."""
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # Not in-place: a split tail must never overwrite the tensor its head handed over.
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_channels, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand, with a shortcut (ResNet-50)."""

    expansion: ClassVar[int] = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        """Build a block mapping ``in_channels`` to ``planes * 4`` channels at ``stride``."""
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _make_stage(
    block: type[BasicBlock | Bottleneck], in_channels: int, planes: int, blocks: int, stride: int
) -> nn.Sequential:
    """Build one stage; only its first block changes resolution or width."""
    stage = [block(in_channels, planes, stride)]
    stage.extend(block(planes * block.expansion, planes) for _ in range(1, blocks))
    return nn.Sequential(*stage)


class ResNet(nn.Module):
    """A ResNet whose stage widths scale with ``width``.

    With ``small_input`` the stem is a 3x3 stride-1 convolution and the max-pool is an
    ``nn.Identity``, which suits 28x28 and 32x32 inputs and keeps the state-dict keys.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        width: float = 1.0,
        small_input: bool = False,
    ) -> None:
        """Build the network from a block type and the number of blocks in each stage."""
        super().__init__()
        check_common_args(num_classes, in_channels, width)
        if len(layers) != 4:
            raise ValueError(f"a ResNet has 4 stages, got block counts {tuple(layers)}")
        base = scale_channels(_BASE_CHANNELS, width)
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, base, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU()
        self.maxpool: nn.Module = (
            nn.Identity() if small_input else nn.MaxPool2d(3, stride=2, padding=1)
        )
        stages = []
        channels = base
        for i, blocks in enumerate(layers):
            planes = base * 2**i
            stages.append(_make_stage(block, channels, planes, blocks, stride=1 if i == 0 else 2))
            channels = planes * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of images."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register_model("resnet18")
def resnet18(
    *, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0, small_input: bool = False
) -> ResNet:
    """Build ResNet-18."""
    return ResNet(
        BasicBlock,
        (2, 2, 2, 2),
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        small_input=small_input,
    )


@register_model("resnet34")
def resnet34(
    *, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0, small_input: bool = False
) -> ResNet:
    """Build ResNet-34."""
    return ResNet(
        BasicBlock,
        (3, 4, 6, 3),
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        small_input=small_input,
    )


@register_model("resnet50")
def resnet50(
    *, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0, small_input: bool = False
) -> ResNet:
    """Build ResNet-50 (bottleneck blocks, stride on the 3x3 convolution)."""
    return ResNet(
        Bottleneck,
        (3, 4, 6, 3),
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        small_input=small_input,
    )
