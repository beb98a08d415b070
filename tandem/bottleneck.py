"""The learned bottleneck: a compact encoder on the device, a decoder in the cloud.

The encoder replaces the original model's head up to the cut. It ends in a narrow projection
whose output is the tensor that crosses the network. The decoder, at the start of the tail,
reconstructs the original model's features at the cut from it.

Both are *slimmable*: the projection has ``channels`` outputs, and a run-time ``width``
keeps only the first ``round(width * channels)`` of them. The decoder reads however many
channels arrive, so one trained pair serves every width without reloading. ``encode`` and
``decode`` are named for the wire boundary: what ``encode`` returns is what gets sent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.widths import width_channels


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BottleneckEncoder(nn.Module):
    """Device-side encoder: conv stages, then a slimmable projection to the bottleneck."""

    def __init__(
        self,
        in_channels: int,
        stages: list[tuple[int, int]],
        channels: int,
        widths: list[float],
    ) -> None:
        super().__init__()
        layers, cin = [], in_channels
        for cout, stride in stages:
            layers.append(_conv_bn_relu(cin, cout, stride))
            cin = cout
        self.body = nn.Sequential(*layers)
        self.project = nn.Conv2d(cin, channels, 1)
        self.channels = channels
        self.widths = list(widths)

    def encode(self, x: torch.Tensor, width: float = 1.0) -> torch.Tensor:
        """Map normalised inputs to the bottleneck tensor sent at ``width``."""
        k = width_channels(self.channels, width)
        # Slicing the projection computes only the channels that are sent.
        bias = self.project.bias
        assert bias is not None
        return F.conv2d(self.body(x), self.project.weight[:k], bias[:k])

    def forward(self, x: torch.Tensor, width: float = 1.0) -> torch.Tensor:
        """Same as :meth:`encode`."""
        return self.encode(x, width)


class BottleneckDecoder(nn.Module):
    """Cloud-side decoder: rebuilds the original model's features at the cut.

    The first layer reads only the channels that arrived (the same as zero-filling the rest),
    and keeps one batch-norm per width, because feature statistics differ between widths.
    """

    def __init__(
        self,
        channels: int,
        widths: list[float],
        stages: list[tuple[int, int]],
        out_channels: int,
    ) -> None:
        super().__init__()
        hidden = stages[0][0] if stages else out_channels
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.norms = nn.ModuleList(nn.BatchNorm2d(hidden) for _ in widths)
        layers: list[nn.Module] = []
        cin = hidden
        for cout, factor in stages:
            if factor > 1:
                layers.append(nn.Upsample(scale_factor=factor, mode="nearest"))
            layers.append(_conv_bn_relu(cin, cout))
            cin = cout
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(cin, out_channels, 1)
        self.channels = channels
        self._norm_index = {width_channels(channels, w): i for i, w in enumerate(widths)}
        if len(self._norm_index) != len(widths):
            raise ValueError(f"widths {widths} map to repeated channel counts of {channels}")

    def accepted_channels(self) -> list[int]:
        """Channel counts this decoder accepts, one per trained width."""
        return sorted(self._norm_index)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Map a received bottleneck tensor back to features at the cut."""
        k = int(z.shape[1])
        if k not in self._norm_index:
            raise ValueError(
                f"bottleneck has {k} channels; expected one of {self.accepted_channels()}"
            )
        h = F.conv2d(z, self.expand.weight[:, :k])
        h = F.relu(self.norms[self._norm_index[k]](h), inplace=True)
        return self.out(self.body(h))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`decode`."""
        return self.decode(z)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad


def fake_quantize(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize per sample and channel as the codec does, passing gradients straight through.

    Training through this makes the decoder and tail see exactly the rounding error that the
    wire format introduces at ``bits`` (16 means fp16, which is close enough to leave as is).
    """
    if bits >= 16:
        return z
    lo = z.amin(dim=(-2, -1), keepdim=True)
    hi = z.amax(dim=(-2, -1), keepdim=True)
    levels = (1 << bits) - 1
    step = ((hi - lo) / levels).clamp_min(1e-8)
    q = _RoundSTE.apply(((z - lo) / step).clamp(0, levels))
    return q * step + lo


class CloudTail(nn.Module):
    """What the cloud runs: the decoder followed by the original model's tail."""

    def __init__(self, decoder: BottleneckDecoder, tail: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        self.tail = tail

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits for received bottleneck tensors."""
        return self.tail(self.decoder.decode(z))


def build_bottleneck(
    in_channels: int,
    cut_channels: int,
    channels: int,
    widths: list[float],
    encoder_stages: list[tuple[int, int]],
    decoder_stages: list[tuple[int, int]],
) -> tuple[BottleneckEncoder, BottleneckDecoder]:
    """Build a matching encoder/decoder pair for a cut carrying ``cut_channels`` channels."""
    encoder = BottleneckEncoder(in_channels, encoder_stages, channels, widths)
    decoder = BottleneckDecoder(channels, widths, decoder_stages, cut_channels)
    return encoder, decoder
