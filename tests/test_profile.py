"""Tests for per-cut profiling."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from tandem.models import build_model
from tandem.profile import CutProfile, model_flops, profile_cuts


class TinyNet(nn.Module):
    """Conv(1->4, 3x3, pad 1), ReLU, flatten, Linear(4*8*8 -> 10), for 1x8x8 inputs."""

    def __init__(self) -> None:
        """Build the layers."""
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits."""
        return self.fc(torch.flatten(self.act(self.conv(x)), 1))


# Two FLOPs per multiply-add. Conv: 4*8*8 outputs, each 1*3*3 products. Linear: 256*10.
TINY_CONV_FLOPS = 2 * (4 * 8 * 8) * (1 * 3 * 3)
TINY_FC_FLOPS = 2 * 256 * 10


@pytest.fixture(scope="module")
def resnet_profiles() -> list[CutProfile]:
    """Profile a small ResNet-18 at every cut."""
    torch.manual_seed(0)
    model = build_model("resnet18", small_input=True, width=0.125, num_classes=10)
    return profile_cuts(model, (3, 32, 32), repeats=2)


def test_tiny_net_flops_by_hand() -> None:
    model = TinyNet()
    assert model_flops(model, (1, 8, 8)) == TINY_CONV_FLOPS + TINY_FC_FLOPS == 9728
    by_name = {p.name: p for p in profile_cuts(model, (1, 8, 8), repeats=1)}
    assert list(by_name) == ["conv", "act", "flatten", "fc"]
    assert by_name["conv"].head_flops == TINY_CONV_FLOPS
    assert by_name["conv"].tail_flops == TINY_FC_FLOPS
    assert by_name["conv"].shape == (4, 8, 8)
    assert by_name["flatten"].shape == (256,)
    assert by_name["fc"].tail_flops == 0
    assert by_name["conv"].head_params == 4 * 9 + 4


def test_head_plus_tail_flops_is_model_flops(resnet_profiles: list[CutProfile]) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", small_input=True, width=0.125, num_classes=10)
    total = model_flops(model, (3, 32, 32))
    assert total > 0
    for profile in resnet_profiles:
        assert profile.head_flops + profile.tail_flops == total, profile.name


def test_vit_flops_include_attention() -> None:
    model = build_model("vit_small", small_input=True, width=0.125, depth=1, heads=2)
    total = model_flops(model, (3, 32, 32))
    profiles = profile_cuts(model, (3, 32, 32), repeats=0)
    assert all(p.head_flops + p.tail_flops == total for p in profiles)
    tokens, hidden, mlp = 65, 48, 192
    linear = 2 * tokens * hidden * (4 * hidden + 2 * mlp)
    attention = 2 * 2 * tokens * tokens * hidden
    patches = 2 * 64 * hidden * 3 * 4 * 4
    assert total == patches + linear + attention + 2 * hidden * 1000


def test_raw_bytes_match_shape(resnet_profiles: list[CutProfile]) -> None:
    for profile in resnet_profiles:
        assert profile.dtype == "float32"
        assert profile.raw_bytes == math.prod(profile.shape) * 4
    by_name = {p.name: p for p in resnet_profiles}
    assert by_name["layer2"].shape == (16, 16, 16)
    assert by_name["fc"].shape == (10,)


def test_params_add_up(resnet_profiles: list[CutProfile]) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", small_input=True, width=0.125, num_classes=10)
    total = sum(p.numel() for p in model.parameters())
    for profile in resnet_profiles:
        assert profile.head_params + profile.tail_params == total, profile.name


def test_head_flops_never_decrease(resnet_profiles: list[CutProfile]) -> None:
    flops = [p.head_flops for p in resnet_profiles]
    assert flops == sorted(flops)
    assert [p.index for p in resnet_profiles] == list(range(len(resnet_profiles)))


def test_latency_is_positive(resnet_profiles: list[CutProfile]) -> None:
    for profile in resnet_profiles:
        assert profile.head_latency_ms is not None
        assert profile.head_latency_ms > 0


def test_selected_cuts_progress_and_json() -> None:
    ticks: list[int] = []
    profiles = profile_cuts(
        TinyNet(),
        (1, 8, 8),
        batch_size=3,
        repeats=1,
        cuts=["fc", "conv"],
        progress=lambda: ticks.append(1),
    )
    assert [p.name for p in profiles] == ["conv", "fc"]
    assert len(ticks) == 2
    decoded = json.loads(json.dumps([p.to_dict() for p in profiles]))
    assert decoded[0]["shape"] == [4, 8, 8]
    assert decoded[0]["head_flops"] == TINY_CONV_FLOPS


def test_profile_restores_training_mode() -> None:
    model = TinyNet().train()
    profile_cuts(model, (1, 8, 8), repeats=1)
    assert model.training and model.conv.training


def test_meta_model_needs_repeats_zero() -> None:
    with torch.device("meta"):
        model = build_model("resnet18", small_input=True, width=0.125)
    with pytest.raises(ValueError, match="repeats=0"):
        profile_cuts(model, (3, 32, 32))
    profiles = profile_cuts(model, (3, 32, 32), repeats=0)
    assert all(p.head_latency_ms is None for p in profiles)
    assert profiles[-1].head_flops == model_flops(model, (3, 32, 32))


@pytest.mark.slow
def test_resnet50_full_size_profile() -> None:
    torch.manual_seed(0)
    model = build_model("resnet50")
    profiles = profile_cuts(model, (3, 224, 224), repeats=1)
    assert len(profiles) == 39 and profiles[17].name == "layer2"
    assert profiles[-1].head_flops == model_flops(model, (3, 224, 224))
    # About 4.1 GMACs for torchvision's ResNet-50; two FLOPs per multiply-add.
    assert 8.0e9 < profiles[-1].head_flops < 8.4e9
