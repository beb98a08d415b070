"""A torchvision ResNet-50 checkpoint, as a user brings it, loads as the teacher and splits.

torchvision cannot be installed here, so the checkpoint is written from torchvision's
published layout (key names, their order and every shape) by :func:`torchvision_resnet50_state`,
which knows nothing of the zoo's modules: a renamed or reshaped zoo parameter fails the load.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tandem.models import build_model
from tandem.split import split_model
from tandem.train import load_checkpoint_weights

# torchvision's resnet50: Bottleneck blocks (expansion 4) in four stages of 3, 4, 6, 3.
STAGES = (3, 4, 6, 3)
EXPANSION = 4
RESNET50_PARAMETERS = 25_557_032  # torchvision's documented count at 1,000 classes


def _batch_norm(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    """The five entries torchvision's BatchNorm2d writes, in its order."""
    shapes = {f"{prefix}.{k}": (channels,) for k in ("weight", "bias", "running_mean")}
    return {**shapes, f"{prefix}.running_var": (channels,), f"{prefix}.num_batches_tracked": ()}


def torchvision_resnet50_shapes(classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``torchvision.models.resnet50(num_classes=classes).state_dict()``."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7), **_batch_norm("bn1", 64)}
    inplanes = 64
    for stage, blocks in enumerate(STAGES, start=1):
        planes = 64 * 2 ** (stage - 1)
        for block in range(blocks):
            p = f"layer{stage}.{block}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            shapes.update(_batch_norm(f"{p}.bn1", planes))
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            shapes.update(_batch_norm(f"{p}.bn2", planes))
            shapes[f"{p}.conv3.weight"] = (planes * EXPANSION, planes, 1, 1)
            shapes.update(_batch_norm(f"{p}.bn3", planes * EXPANSION))
            if block == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * EXPANSION, inplanes, 1, 1)
                shapes.update(_batch_norm(f"{p}.downsample.1", planes * EXPANSION))
            inplanes = planes * EXPANSION
    shapes["fc.weight"] = (classes, inplanes)
    shapes["fc.bias"] = (classes,)
    return shapes


def torchvision_resnet50_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint in torchvision's layout with random, well-scaled values (He-scaled
    convolutions, positive running variances), so 50 layers keep activations finite."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in torchvision_resnet50_shapes().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=gen) * (2 / fan_in) ** 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.1
    return state


def test_the_layout_is_torchvisions() -> None:
    shapes = torchvision_resnet50_shapes()
    params = sum(
        torch.Size(s).numel()
        for k, s in shapes.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert params == RESNET50_PARAMETERS
    assert len(shapes) == 320  # 161 parameters and 159 buffers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return torchvision_resnet50_state()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_torchvision_checkpoint_loads_as_the_teacher(
    checkpoint: dict[str, torch.Tensor], tmp_path: Path, suffix: str
) -> None:
    """Both file kinds users bring; a ``.pth`` wraps the state dict as training scripts do."""
    path = tmp_path / f"resnet50{suffix}"
    if suffix == ".safetensors":
        save_file(checkpoint, str(path))
    else:
        torch.save({"state_dict": checkpoint, "epoch": 90}, path)
    model = build_model("resnet50", num_classes=1000)
    assert list(model.state_dict()) == list(checkpoint)  # torchvision's order, too
    model.load_state_dict(load_checkpoint_weights(path), strict=True)
    for key, value in checkpoint.items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.slow
def test_a_torchvision_resnet50_cut_at_three_stages_computes_the_whole_model(
    checkpoint: dict[str, torch.Tensor],
) -> None:
    model = build_model("resnet50", num_classes=1000)
    model.load_state_dict(checkpoint, strict=True)
    model.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = model(x)
        assert torch.isfinite(whole).all() and whole.abs().max() > 1e-3
        for cut, crossing in [
            ("layer1", (256, 56, 56)),
            ("layer2", (512, 28, 28)),
            ("layer3", (1024, 14, 14)),
        ]:
            parts = split_model(model, cut)
            features = parts.head(x)
            assert tuple(features.shape[1:]) == crossing
            # The same kernels on the same values in the same order: equal, not just close.
            assert torch.equal(parts.tail(features), whole), cut
