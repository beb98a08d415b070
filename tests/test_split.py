"""Tests for cutting models into a head and a tail."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from tandem.models import available_models, build_model
from tandem.split import (
    SplitError,
    UnknownCutError,
    list_cut_points,
    parameter_names,
    resolve_cut,
    split_model,
    trace_model,
)

# name -> (constructor arguments, input shape without batch)
ZOO: dict[str, tuple[dict[str, object], tuple[int, ...]]] = {
    "resnet18": ({"width": 0.125}, (3, 32, 32)),
    "resnet34": ({"width": 0.0625, "in_channels": 1}, (1, 28, 28)),
    "resnet50": ({"width": 0.0625}, (3, 32, 32)),
    "mobilenet_v2": ({"width": 0.25, "in_channels": 1}, (1, 28, 28)),
    "vit_small": ({"width": 0.125, "depth": 2, "heads": 2}, (3, 32, 32)),
}

RESNET18_CUTS = [
    "conv1", "bn1", "relu", "maxpool",
    "add", "layer1.0", "add_1", "layer1",
    "add_2", "layer2.0", "add_3", "layer2",
    "add_4", "layer3.0", "add_5", "layer3",
    "add_6", "layer4.0", "add_7", "layer4",
    "avgpool", "flatten", "fc",
]  # fmt: skip


def zoo_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """Return a small seeded eval-mode zoo model and a seeded batch of two inputs for it."""
    kwargs, shape = ZOO[name]
    torch.manual_seed(0)
    model = build_model(name, small_input=True, num_classes=10, **kwargs).eval()
    return model, torch.randn(2, *shape)


def resnet18_small() -> nn.Module:
    """Return the small-input ResNet-18 used by the naming tests."""
    torch.manual_seed(0)
    return build_model("resnet18", small_input=True, width=0.125, num_classes=10).eval()


def test_zoo_table_covers_registry() -> None:
    assert sorted(ZOO) == available_models()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_cut_reproduces_the_model(name: str) -> None:
    model, x = zoo_model(name)
    traced = trace_model(model)
    assert traced.cut_points, name
    with torch.no_grad():
        expected = model(x)
        for cut in traced.cut_points:
            split = traced.split(cut)
            got = split.tail(split.head(x))
            assert (got - expected).abs().max().item() <= 1e-5, cut.name
            assert not parameter_names(split.head) & parameter_names(split.tail), cut.name
            assert not split.unreferenced(model), cut.name


def test_resnet18_cut_point_names() -> None:
    cuts = list_cut_points(resnet18_small())
    assert [cut.name for cut in cuts] == RESNET18_CUTS
    assert [cut.index for cut in cuts] == list(range(len(cuts)))
    layer2 = cuts[RESNET18_CUTS.index("layer2")]
    assert layer2.node == "layer2_1_relu_1"
    assert set(layer2.aliases) == {"layer2.1", "layer2_1_relu_1"}


@pytest.mark.parametrize(
    ("name", "alias", "expected"),
    [
        ("resnet18", "layer2", "layer2"),
        ("resnet18", "layer2.1", "layer2"),
        ("resnet18", "layer2_1_relu_1", "layer2"),
        ("resnet18", "layer3.0.relu", None),
        ("mobilenet_v2", "features.3", "features.3"),
        ("mobilenet_v2", "features.18.2", "features"),
        ("vit_small", "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_0"),
        ("vit_small", "encoder.ln", "encoder"),
    ],
)
def test_friendly_names_resolve(name: str, alias: str, expected: str | None) -> None:
    model, _ = zoo_model(name)
    if expected is None:
        # A module called twice (the shared ReLU of a block) names no single place.
        with pytest.raises(SplitError, match="more than once"):
            resolve_cut(model, alias)
    else:
        assert resolve_cut(model, alias).name == expected


def test_split_state_is_disjoint_and_complete() -> None:
    model = resnet18_small()
    split = split_model(model, "layer2")
    head, tail = parameter_names(split.head), parameter_names(split.tail)
    assert not head & tail
    assert head | tail == parameter_names(model)
    assert "layer2.1.bn2.num_batches_tracked" in head
    assert {"layer3.0.conv1.weight", "fc.weight"} <= tail
    assert not any(key.startswith(("layer3", "layer4", "fc")) for key in head)
    assert isinstance(split.head, fx.GraphModule)
    assert isinstance(split.tail, fx.GraphModule)


def test_vit_tail_recreates_constants() -> None:
    model, x = zoo_model("vit_small")
    split = split_model(model, "conv_proj")
    tail = parameter_names(split.tail)
    assert {"class_token", "encoder.pos_embedding"} <= tail
    assert parameter_names(split.head) == {"conv_proj.weight", "conv_proj.bias"}
    with torch.no_grad():
        assert torch.allclose(split.tail(split.head(x)), model(x), atol=1e-5)


@pytest.mark.parametrize(
    ("cut", "crossing", "before", "after"),
    [
        ("layer2.0.bn2", "'layer1'", "layer1", "add_2"),
        ("layer1_0_relu", "'maxpool'", "maxpool", "add"),
        ("layer3.0.downsample", "'layer3.0.bn2'", "layer2", "add_4"),
    ],
)
def test_cut_inside_residual_block_is_rejected(
    cut: str, crossing: str, before: str, after: str
) -> None:
    with pytest.raises(SplitError) as info:
        split_model(resnet18_small(), cut)
    message = str(info.value)
    assert "2 values would cross" in message
    assert crossing in message
    assert f"before: '{before}'" in message
    assert f"after: '{after}'" in message


def test_input_and_output_are_not_cuts() -> None:
    model = resnet18_small()
    with pytest.raises(SplitError, match="model input"):
        split_model(model, "x")
    with pytest.raises(SplitError, match="output"):
        split_model(model, "output")


def test_unknown_cut_lists_valid_names() -> None:
    with pytest.raises(UnknownCutError) as info:
        split_model(resnet18_small(), "layr2")
    message = str(info.value)
    assert "Did you mean 'layer2'" in message
    assert "'conv1', 'bn1'" in message
    assert isinstance(info.value, ValueError)


def test_last_cut_has_an_identity_tail() -> None:
    model, x = zoo_model("resnet18")
    split = split_model(model, "fc")
    assert not parameter_names(split.tail)
    with torch.no_grad():
        assert torch.equal(split.tail(split.head(x)), model(x))


def test_meta_device_tail_loads_real_weights() -> None:
    model, x = zoo_model("resnet18")
    kwargs, _ = ZOO["resnet18"]
    with torch.device("meta"):
        meta = build_model("resnet18", small_input=True, num_classes=10, **kwargs)
    tail = split_model(meta, "layer2").tail.to_empty(device="cpu")
    state = model.state_dict()
    tail.load_state_dict({key: state[key] for key in parameter_names(tail)}, strict=True)
    tail.eval()
    head = split_model(model, "layer2").head
    with torch.no_grad():
        assert torch.allclose(tail(head(x)), model(x), atol=1e-5)


def test_split_keeps_training_mode_and_original_modules() -> None:
    model = resnet18_small().train()
    split = split_model(model, "layer1")
    assert split.head.training and split.tail.training
    conv = "layer1.0.conv1"
    assert split.head.get_submodule(conv) is model.get_submodule(conv)
