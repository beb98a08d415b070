"""Tests for the model zoo: torchvision key compatibility, shapes, checkpoints, registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import fx, nn

from tandem.models import (
    UnknownModelError,
    available_models,
    build_model,
    make_divisible,
    mobilenet_v2,
    register_model,
    resnet18,
)

# State-dict keys of torchvision's resnet18() and mobilenet_v2(), in torchvision's order.
# fmt: off
RESNET18_KEYS = (
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
    "bn1.num_batches_tracked", "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias",
    "layer1.0.bn1.running_mean", "layer1.0.bn1.running_var", "layer1.0.bn1.num_batches_tracked",
    "layer1.0.conv2.weight", "layer1.0.bn2.weight", "layer1.0.bn2.bias",
    "layer1.0.bn2.running_mean", "layer1.0.bn2.running_var", "layer1.0.bn2.num_batches_tracked",
    "layer1.1.conv1.weight", "layer1.1.bn1.weight", "layer1.1.bn1.bias",
    "layer1.1.bn1.running_mean", "layer1.1.bn1.running_var", "layer1.1.bn1.num_batches_tracked",
    "layer1.1.conv2.weight", "layer1.1.bn2.weight", "layer1.1.bn2.bias",
    "layer1.1.bn2.running_mean", "layer1.1.bn2.running_var", "layer1.1.bn2.num_batches_tracked",
    "layer2.0.conv1.weight", "layer2.0.bn1.weight", "layer2.0.bn1.bias",
    "layer2.0.bn1.running_mean", "layer2.0.bn1.running_var", "layer2.0.bn1.num_batches_tracked",
    "layer2.0.conv2.weight", "layer2.0.bn2.weight", "layer2.0.bn2.bias",
    "layer2.0.bn2.running_mean", "layer2.0.bn2.running_var", "layer2.0.bn2.num_batches_tracked",
    "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight", "layer2.0.downsample.1.bias",
    "layer2.0.downsample.1.running_mean", "layer2.0.downsample.1.running_var",
    "layer2.0.downsample.1.num_batches_tracked", "layer2.1.conv1.weight", "layer2.1.bn1.weight",
    "layer2.1.bn1.bias", "layer2.1.bn1.running_mean", "layer2.1.bn1.running_var",
    "layer2.1.bn1.num_batches_tracked", "layer2.1.conv2.weight", "layer2.1.bn2.weight",
    "layer2.1.bn2.bias", "layer2.1.bn2.running_mean", "layer2.1.bn2.running_var",
    "layer2.1.bn2.num_batches_tracked", "layer3.0.conv1.weight", "layer3.0.bn1.weight",
    "layer3.0.bn1.bias", "layer3.0.bn1.running_mean", "layer3.0.bn1.running_var",
    "layer3.0.bn1.num_batches_tracked", "layer3.0.conv2.weight", "layer3.0.bn2.weight",
    "layer3.0.bn2.bias", "layer3.0.bn2.running_mean", "layer3.0.bn2.running_var",
    "layer3.0.bn2.num_batches_tracked", "layer3.0.downsample.0.weight",
    "layer3.0.downsample.1.weight", "layer3.0.downsample.1.bias",
    "layer3.0.downsample.1.running_mean", "layer3.0.downsample.1.running_var",
    "layer3.0.downsample.1.num_batches_tracked", "layer3.1.conv1.weight", "layer3.1.bn1.weight",
    "layer3.1.bn1.bias", "layer3.1.bn1.running_mean", "layer3.1.bn1.running_var",
    "layer3.1.bn1.num_batches_tracked", "layer3.1.conv2.weight", "layer3.1.bn2.weight",
    "layer3.1.bn2.bias", "layer3.1.bn2.running_mean", "layer3.1.bn2.running_var",
    "layer3.1.bn2.num_batches_tracked", "layer4.0.conv1.weight", "layer4.0.bn1.weight",
    "layer4.0.bn1.bias", "layer4.0.bn1.running_mean", "layer4.0.bn1.running_var",
    "layer4.0.bn1.num_batches_tracked", "layer4.0.conv2.weight", "layer4.0.bn2.weight",
    "layer4.0.bn2.bias", "layer4.0.bn2.running_mean", "layer4.0.bn2.running_var",
    "layer4.0.bn2.num_batches_tracked", "layer4.0.downsample.0.weight",
    "layer4.0.downsample.1.weight", "layer4.0.downsample.1.bias",
    "layer4.0.downsample.1.running_mean", "layer4.0.downsample.1.running_var",
    "layer4.0.downsample.1.num_batches_tracked", "layer4.1.conv1.weight", "layer4.1.bn1.weight",
    "layer4.1.bn1.bias", "layer4.1.bn1.running_mean", "layer4.1.bn1.running_var",
    "layer4.1.bn1.num_batches_tracked", "layer4.1.conv2.weight", "layer4.1.bn2.weight",
    "layer4.1.bn2.bias", "layer4.1.bn2.running_mean", "layer4.1.bn2.running_var",
    "layer4.1.bn2.num_batches_tracked", "fc.weight", "fc.bias",
)
MOBILENET_V2_KEYS = (
    "features.0.0.weight", "features.0.1.weight", "features.0.1.bias", "features.0.1.running_mean",
    "features.0.1.running_var", "features.0.1.num_batches_tracked", "features.1.conv.0.0.weight",
    "features.1.conv.0.1.weight", "features.1.conv.0.1.bias", "features.1.conv.0.1.running_mean",
    "features.1.conv.0.1.running_var", "features.1.conv.0.1.num_batches_tracked",
    "features.1.conv.1.weight", "features.1.conv.2.weight", "features.1.conv.2.bias",
    "features.1.conv.2.running_mean", "features.1.conv.2.running_var",
    "features.1.conv.2.num_batches_tracked", "features.2.conv.0.0.weight",
    "features.2.conv.0.1.weight", "features.2.conv.0.1.bias", "features.2.conv.0.1.running_mean",
    "features.2.conv.0.1.running_var", "features.2.conv.0.1.num_batches_tracked",
    "features.2.conv.1.0.weight", "features.2.conv.1.1.weight", "features.2.conv.1.1.bias",
    "features.2.conv.1.1.running_mean", "features.2.conv.1.1.running_var",
    "features.2.conv.1.1.num_batches_tracked", "features.2.conv.2.weight",
    "features.2.conv.3.weight", "features.2.conv.3.bias", "features.2.conv.3.running_mean",
    "features.2.conv.3.running_var", "features.2.conv.3.num_batches_tracked",
    "features.3.conv.0.0.weight", "features.3.conv.0.1.weight", "features.3.conv.0.1.bias",
    "features.3.conv.0.1.running_mean", "features.3.conv.0.1.running_var",
    "features.3.conv.0.1.num_batches_tracked", "features.3.conv.1.0.weight",
    "features.3.conv.1.1.weight", "features.3.conv.1.1.bias", "features.3.conv.1.1.running_mean",
    "features.3.conv.1.1.running_var", "features.3.conv.1.1.num_batches_tracked",
    "features.3.conv.2.weight", "features.3.conv.3.weight", "features.3.conv.3.bias",
    "features.3.conv.3.running_mean", "features.3.conv.3.running_var",
    "features.3.conv.3.num_batches_tracked", "features.4.conv.0.0.weight",
    "features.4.conv.0.1.weight", "features.4.conv.0.1.bias", "features.4.conv.0.1.running_mean",
    "features.4.conv.0.1.running_var", "features.4.conv.0.1.num_batches_tracked",
    "features.4.conv.1.0.weight", "features.4.conv.1.1.weight", "features.4.conv.1.1.bias",
    "features.4.conv.1.1.running_mean", "features.4.conv.1.1.running_var",
    "features.4.conv.1.1.num_batches_tracked", "features.4.conv.2.weight",
    "features.4.conv.3.weight", "features.4.conv.3.bias", "features.4.conv.3.running_mean",
    "features.4.conv.3.running_var", "features.4.conv.3.num_batches_tracked",
    "features.5.conv.0.0.weight", "features.5.conv.0.1.weight", "features.5.conv.0.1.bias",
    "features.5.conv.0.1.running_mean", "features.5.conv.0.1.running_var",
    "features.5.conv.0.1.num_batches_tracked", "features.5.conv.1.0.weight",
    "features.5.conv.1.1.weight", "features.5.conv.1.1.bias", "features.5.conv.1.1.running_mean",
    "features.5.conv.1.1.running_var", "features.5.conv.1.1.num_batches_tracked",
    "features.5.conv.2.weight", "features.5.conv.3.weight", "features.5.conv.3.bias",
    "features.5.conv.3.running_mean", "features.5.conv.3.running_var",
    "features.5.conv.3.num_batches_tracked", "features.6.conv.0.0.weight",
    "features.6.conv.0.1.weight", "features.6.conv.0.1.bias", "features.6.conv.0.1.running_mean",
    "features.6.conv.0.1.running_var", "features.6.conv.0.1.num_batches_tracked",
    "features.6.conv.1.0.weight", "features.6.conv.1.1.weight", "features.6.conv.1.1.bias",
    "features.6.conv.1.1.running_mean", "features.6.conv.1.1.running_var",
    "features.6.conv.1.1.num_batches_tracked", "features.6.conv.2.weight",
    "features.6.conv.3.weight", "features.6.conv.3.bias", "features.6.conv.3.running_mean",
    "features.6.conv.3.running_var", "features.6.conv.3.num_batches_tracked",
    "features.7.conv.0.0.weight", "features.7.conv.0.1.weight", "features.7.conv.0.1.bias",
    "features.7.conv.0.1.running_mean", "features.7.conv.0.1.running_var",
    "features.7.conv.0.1.num_batches_tracked", "features.7.conv.1.0.weight",
    "features.7.conv.1.1.weight", "features.7.conv.1.1.bias", "features.7.conv.1.1.running_mean",
    "features.7.conv.1.1.running_var", "features.7.conv.1.1.num_batches_tracked",
    "features.7.conv.2.weight", "features.7.conv.3.weight", "features.7.conv.3.bias",
    "features.7.conv.3.running_mean", "features.7.conv.3.running_var",
    "features.7.conv.3.num_batches_tracked", "features.8.conv.0.0.weight",
    "features.8.conv.0.1.weight", "features.8.conv.0.1.bias", "features.8.conv.0.1.running_mean",
    "features.8.conv.0.1.running_var", "features.8.conv.0.1.num_batches_tracked",
    "features.8.conv.1.0.weight", "features.8.conv.1.1.weight", "features.8.conv.1.1.bias",
    "features.8.conv.1.1.running_mean", "features.8.conv.1.1.running_var",
    "features.8.conv.1.1.num_batches_tracked", "features.8.conv.2.weight",
    "features.8.conv.3.weight", "features.8.conv.3.bias", "features.8.conv.3.running_mean",
    "features.8.conv.3.running_var", "features.8.conv.3.num_batches_tracked",
    "features.9.conv.0.0.weight", "features.9.conv.0.1.weight", "features.9.conv.0.1.bias",
    "features.9.conv.0.1.running_mean", "features.9.conv.0.1.running_var",
    "features.9.conv.0.1.num_batches_tracked", "features.9.conv.1.0.weight",
    "features.9.conv.1.1.weight", "features.9.conv.1.1.bias", "features.9.conv.1.1.running_mean",
    "features.9.conv.1.1.running_var", "features.9.conv.1.1.num_batches_tracked",
    "features.9.conv.2.weight", "features.9.conv.3.weight", "features.9.conv.3.bias",
    "features.9.conv.3.running_mean", "features.9.conv.3.running_var",
    "features.9.conv.3.num_batches_tracked", "features.10.conv.0.0.weight",
    "features.10.conv.0.1.weight", "features.10.conv.0.1.bias",
    "features.10.conv.0.1.running_mean", "features.10.conv.0.1.running_var",
    "features.10.conv.0.1.num_batches_tracked", "features.10.conv.1.0.weight",
    "features.10.conv.1.1.weight", "features.10.conv.1.1.bias",
    "features.10.conv.1.1.running_mean", "features.10.conv.1.1.running_var",
    "features.10.conv.1.1.num_batches_tracked", "features.10.conv.2.weight",
    "features.10.conv.3.weight", "features.10.conv.3.bias", "features.10.conv.3.running_mean",
    "features.10.conv.3.running_var", "features.10.conv.3.num_batches_tracked",
    "features.11.conv.0.0.weight", "features.11.conv.0.1.weight", "features.11.conv.0.1.bias",
    "features.11.conv.0.1.running_mean", "features.11.conv.0.1.running_var",
    "features.11.conv.0.1.num_batches_tracked", "features.11.conv.1.0.weight",
    "features.11.conv.1.1.weight", "features.11.conv.1.1.bias",
    "features.11.conv.1.1.running_mean", "features.11.conv.1.1.running_var",
    "features.11.conv.1.1.num_batches_tracked", "features.11.conv.2.weight",
    "features.11.conv.3.weight", "features.11.conv.3.bias", "features.11.conv.3.running_mean",
    "features.11.conv.3.running_var", "features.11.conv.3.num_batches_tracked",
    "features.12.conv.0.0.weight", "features.12.conv.0.1.weight", "features.12.conv.0.1.bias",
    "features.12.conv.0.1.running_mean", "features.12.conv.0.1.running_var",
    "features.12.conv.0.1.num_batches_tracked", "features.12.conv.1.0.weight",
    "features.12.conv.1.1.weight", "features.12.conv.1.1.bias",
    "features.12.conv.1.1.running_mean", "features.12.conv.1.1.running_var",
    "features.12.conv.1.1.num_batches_tracked", "features.12.conv.2.weight",
    "features.12.conv.3.weight", "features.12.conv.3.bias", "features.12.conv.3.running_mean",
    "features.12.conv.3.running_var", "features.12.conv.3.num_batches_tracked",
    "features.13.conv.0.0.weight", "features.13.conv.0.1.weight", "features.13.conv.0.1.bias",
    "features.13.conv.0.1.running_mean", "features.13.conv.0.1.running_var",
    "features.13.conv.0.1.num_batches_tracked", "features.13.conv.1.0.weight",
    "features.13.conv.1.1.weight", "features.13.conv.1.1.bias",
    "features.13.conv.1.1.running_mean", "features.13.conv.1.1.running_var",
    "features.13.conv.1.1.num_batches_tracked", "features.13.conv.2.weight",
    "features.13.conv.3.weight", "features.13.conv.3.bias", "features.13.conv.3.running_mean",
    "features.13.conv.3.running_var", "features.13.conv.3.num_batches_tracked",
    "features.14.conv.0.0.weight", "features.14.conv.0.1.weight", "features.14.conv.0.1.bias",
    "features.14.conv.0.1.running_mean", "features.14.conv.0.1.running_var",
    "features.14.conv.0.1.num_batches_tracked", "features.14.conv.1.0.weight",
    "features.14.conv.1.1.weight", "features.14.conv.1.1.bias",
    "features.14.conv.1.1.running_mean", "features.14.conv.1.1.running_var",
    "features.14.conv.1.1.num_batches_tracked", "features.14.conv.2.weight",
    "features.14.conv.3.weight", "features.14.conv.3.bias", "features.14.conv.3.running_mean",
    "features.14.conv.3.running_var", "features.14.conv.3.num_batches_tracked",
    "features.15.conv.0.0.weight", "features.15.conv.0.1.weight", "features.15.conv.0.1.bias",
    "features.15.conv.0.1.running_mean", "features.15.conv.0.1.running_var",
    "features.15.conv.0.1.num_batches_tracked", "features.15.conv.1.0.weight",
    "features.15.conv.1.1.weight", "features.15.conv.1.1.bias",
    "features.15.conv.1.1.running_mean", "features.15.conv.1.1.running_var",
    "features.15.conv.1.1.num_batches_tracked", "features.15.conv.2.weight",
    "features.15.conv.3.weight", "features.15.conv.3.bias", "features.15.conv.3.running_mean",
    "features.15.conv.3.running_var", "features.15.conv.3.num_batches_tracked",
    "features.16.conv.0.0.weight", "features.16.conv.0.1.weight", "features.16.conv.0.1.bias",
    "features.16.conv.0.1.running_mean", "features.16.conv.0.1.running_var",
    "features.16.conv.0.1.num_batches_tracked", "features.16.conv.1.0.weight",
    "features.16.conv.1.1.weight", "features.16.conv.1.1.bias",
    "features.16.conv.1.1.running_mean", "features.16.conv.1.1.running_var",
    "features.16.conv.1.1.num_batches_tracked", "features.16.conv.2.weight",
    "features.16.conv.3.weight", "features.16.conv.3.bias", "features.16.conv.3.running_mean",
    "features.16.conv.3.running_var", "features.16.conv.3.num_batches_tracked",
    "features.17.conv.0.0.weight", "features.17.conv.0.1.weight", "features.17.conv.0.1.bias",
    "features.17.conv.0.1.running_mean", "features.17.conv.0.1.running_var",
    "features.17.conv.0.1.num_batches_tracked", "features.17.conv.1.0.weight",
    "features.17.conv.1.1.weight", "features.17.conv.1.1.bias",
    "features.17.conv.1.1.running_mean", "features.17.conv.1.1.running_var",
    "features.17.conv.1.1.num_batches_tracked", "features.17.conv.2.weight",
    "features.17.conv.3.weight", "features.17.conv.3.bias", "features.17.conv.3.running_mean",
    "features.17.conv.3.running_var", "features.17.conv.3.num_batches_tracked",
    "features.18.0.weight", "features.18.1.weight", "features.18.1.bias",
    "features.18.1.running_mean", "features.18.1.running_var", "features.18.1.num_batches_tracked",
    "classifier.1.weight", "classifier.1.bias",
)
# fmt: on


SMALL_WIDTH = {"resnet18": 0.125, "resnet34": 0.125, "resnet50": 0.0625, "mobilenet_v2": 0.25}
VIT_SMALL_ARGS = {"depth": 2, "heads": 2}


def small_model(name: str, in_channels: int, size: int, **kwargs: object) -> nn.Module:
    """Build a registry model narrow enough for fast tests, sized for ``size`` inputs."""
    extra: dict[str, object] = {"width": SMALL_WIDTH.get(name, 0.125)}
    if name == "vit_small":
        extra.update(VIT_SMALL_ARGS, image_size=size)
    extra.update(kwargs)
    return build_model(name, in_channels=in_channels, small_input=True, **extra)


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters())


def test_torchvision_key_counts() -> None:
    assert len(RESNET18_KEYS) == len(set(RESNET18_KEYS)) == 122
    assert len(MOBILENET_V2_KEYS) == len(set(MOBILENET_V2_KEYS)) == 314


@pytest.mark.parametrize(
    ("factory", "expected"), [(resnet18, RESNET18_KEYS), (mobilenet_v2, MOBILENET_V2_KEYS)]
)
def test_state_dict_keys_match_torchvision(factory: object, expected: tuple[str, ...]) -> None:
    assert callable(factory)
    keys = list(factory().state_dict())
    assert keys == list(expected)


def test_resnet18_shapes_and_size() -> None:
    state = resnet18().state_dict()
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert state["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert state["fc.weight"].shape == (1000, 512)
    assert count_parameters(resnet18()) == 11_689_512


def test_mobilenet_v2_shapes_and_size() -> None:
    model = mobilenet_v2()
    state = model.state_dict()
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)
    assert state["features.2.conv.0.0.weight"].shape == (96, 16, 1, 1)
    assert state["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert state["classifier.1.weight"].shape == (1000, 1280)
    assert count_parameters(model) == 3_504_872


def test_vit_uses_torchvision_names() -> None:
    model = build_model("vit_small", depth=2, width=0.25)
    keys = set(model.state_dict())
    layer = "encoder.layers.encoder_layer_1"
    expected = {
        "class_token",
        "conv_proj.weight",
        "conv_proj.bias",
        "encoder.pos_embedding",
        f"{layer}.ln_1.weight",
        f"{layer}.self_attention.in_proj_weight",
        f"{layer}.self_attention.in_proj_bias",
        f"{layer}.self_attention.out_proj.weight",
        f"{layer}.self_attention.out_proj.bias",
        f"{layer}.ln_2.bias",
        f"{layer}.mlp.0.weight",
        f"{layer}.mlp.3.bias",
        "encoder.ln.weight",
        "heads.head.weight",
        "heads.head.bias",
    }
    assert expected <= keys
    assert model.state_dict()["encoder.pos_embedding"].shape == (1, 197, 96)


def test_vit_width_keeps_hidden_divisible_by_heads() -> None:
    model = build_model("vit_small", depth=1, heads=6, width=0.3)
    hidden = model.state_dict()["class_token"].shape[-1]
    assert hidden % 6 == 0
    assert hidden == 6 * round(384 * 0.3 / 6)


def test_small_input_keeps_resnet_keys() -> None:
    default, small = resnet18(), resnet18(small_input=True)
    assert list(default.state_dict()) == list(small.state_dict())
    assert small.state_dict()["conv1.weight"].shape == (64, 3, 3, 3)
    assert isinstance(small.maxpool, nn.Identity)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = resnet18(width=0.125, num_classes=7).eval()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = resnet18(width=0.125, num_classes=7).eval()
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


@pytest.mark.parametrize("name", available_models())
@pytest.mark.parametrize(("in_channels", "size"), [(1, 28), (3, 32)])
def test_forward_shape_small_input(name: str, in_channels: int, size: int) -> None:
    model = small_model(name, in_channels, size, num_classes=10).eval()
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        out = model(x)
        traced = fx.symbolic_trace(model)(x)
    assert out.shape == (2, 10)
    assert torch.allclose(out, traced)


@pytest.mark.parametrize("name", available_models())
def test_width_scales_parameters(name: str) -> None:
    narrow = small_model(name, 3, 32, width=0.25)
    wide = small_model(name, 3, 32, width=0.5)
    assert count_parameters(narrow) < count_parameters(wide)


@pytest.mark.parametrize("width", [0.01, 0.3, 1.7])
def test_resnet_width_rounding(width: float) -> None:
    state = resnet18(width=width).state_dict()
    base = max(1, round(64 * width))
    assert state["conv1.weight"].shape[0] == base
    assert state["layer4.0.conv1.weight"].shape[0] == 8 * base


def test_make_divisible() -> None:
    assert make_divisible(32 * 1.0) == 32
    assert make_divisible(92) == 96  # nearest multiple of 8
    assert make_divisible(3.0) == 8  # never below the divisor
    # 32 * 0.35 = 11.2 rounds to 8, which loses over 10%, so the guard bumps it to 16.
    assert make_divisible(32 * 0.35) == 16


def test_full_size_224_forward() -> None:
    model = build_model("resnet18", width=0.125, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 5)


def test_unknown_model_lists_available_names() -> None:
    with pytest.raises(UnknownModelError) as info:
        build_model("resnet1000")
    message = str(info.value)
    assert "resnet1000" in message
    for name in ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "vit_small"):
        assert name in message
    assert isinstance(info.value, KeyError)


def test_unknown_argument_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match=r"'resnet18'.*depth.*accepted: num_classes"):
        build_model("resnet18", depth=3)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="width"):
        build_model("mobilenet_v2", width=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="multiple of patch"):
        build_model("vit_small", image_size=30, patch_size=4, depth=1)


def test_duplicate_registration_is_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet18")(resnet18)


def test_meta_device_construction() -> None:
    with torch.device("meta"):
        model = build_model("resnet50")
    assert all(p.is_meta for p in model.parameters())
