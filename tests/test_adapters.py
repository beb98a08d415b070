"""LoRA adapters in PEFT's format: save/load, merged forward passes, and every refusal."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call

from tandem.adapters import (
    Adapter,
    AdapterError,
    list_adapters,
    load_adapter,
    lora_delta,
    merged_state,
    save_adapter,
)

RANK, ALPHA = 4, 8.0


class Net(nn.Module):
    """A conv, a ReLU and a linear: both adaptable kinds, nested like a real tail."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _lora(net: Net, rank: int = RANK) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (A, B) pairs shaped as PEFT shapes them for the conv and the linear."""
    conv, lin = net.features[0], net.head
    assert isinstance(conv, nn.Conv2d)
    return {
        "features.0": (
            torch.randn(rank, conv.in_channels, *conv.kernel_size),
            torch.randn(conv.out_channels, rank, 1, 1),
        ),
        "head": (torch.randn(rank, lin.in_features), torch.randn(lin.out_features, rank)),
    }


def _manual_forward(
    net: Net, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float, x: torch.Tensor
) -> torch.Tensor:
    """PEFT's unmerged forward: base(x) + lora_B(lora_A(x)) * scale, layer by layer."""
    conv = net.features[0]
    assert isinstance(conv, nn.Conv2d)
    a, b = lora["features.0"]
    # lora_A is a conv with the base's kernel, stride and padding; lora_B a 1x1 conv.
    low = F.conv2d(x, a, stride=conv.stride, padding=conv.padding)
    h = conv(x) + F.conv2d(low, b) * scale
    h = torch.relu(h).flatten(1)
    a, b = lora["head"]
    return net.head(h) + (h @ a.T @ b.T) * scale


def _save(path: Path, net: Net, **kwargs: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    lora = _lora(net)
    options: dict[str, Any] = {"rank": RANK, "alpha": ALPHA, "target_modules": ["0", "head"]}
    options.update(kwargs)
    save_adapter(path, lora=lora, **options)
    return lora


def test_round_trip(tmp_path: Path) -> None:
    net = Net()
    lora = _save(tmp_path / "a", net, tenant="acme")
    adapter = load_adapter(tmp_path / "a", "style", "v1")
    assert (adapter.name, adapter.version, adapter.tenant) == ("style", "v1", "acme")
    assert (adapter.rank, adapter.alpha, adapter.scale) == (RANK, ALPHA, ALPHA / RANK)
    assert adapter.targets == ["features.0", "head"]
    assert set(adapter.deltas) == {"features.0.weight", "head.weight"}
    a, b = lora["head"]
    torch.testing.assert_close(adapter.deltas["head.weight"], b @ a * (ALPHA / RANK))

    # The files are PEFT's: its config keys and its tensor names.
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == RANK
    assert config["lora_alpha"] == ALPHA and config["target_modules"] == ["0", "head"]
    assert config["fan_in_fan_out"] is False and config["bias"] == "none"
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert set(tensors) == {
        "base_model.model.features.0.lora_A.weight",
        "base_model.model.features.0.lora_B.weight",
        "base_model.model.head.lora_A.weight",
        "base_model.model.head.lora_B.weight",
    }
    torch.testing.assert_close(tensors["base_model.model.head.lora_B.weight"], b)


def test_factors_keep_the_unmerged_pair(tmp_path: Path) -> None:
    net = Net()
    lora = _save(tmp_path / "a", net)
    adapter = load_adapter(tmp_path / "a", "n", "1")
    assert sorted(adapter.factors) == adapter.targets
    for module, (a, b) in lora.items():
        factors = adapter.factors[module]
        assert factors.rank == RANK
        torch.testing.assert_close(factors.a, a)
        torch.testing.assert_close(factors.b, b.flatten(1).T * (ALPHA / RANK))


def test_shared_adapter_has_an_owner_file_naming_no_tenant(tmp_path: Path) -> None:
    # tandem.json is always written, last: the cloud serves a version only once it exists.
    _save(tmp_path / "a", Net())
    assert json.loads((tmp_path / "a" / "tandem.json").read_text()) == {"tenant": ""}
    assert load_adapter(tmp_path / "a", "n", "1").tenant == ""


def test_merged_forward_equals_lora_forward(tmp_path: Path) -> None:
    net = Net().eval()
    lora = _save(tmp_path / "a", net)
    adapter = load_adapter(tmp_path / "a", "n", "1")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    merged = merged_state(net, adapter)
    assert set(merged) == {"features.0.weight", "head.weight"}

    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        got = functional_call(net, merged, (x,), strict=False)
        want = _manual_forward(net, lora, ALPHA / RANK, x)
        base = net(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-2)  # the adapter changes something
    # The shared base model is untouched.
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_conv_delta_matches_peft_layers() -> None:
    """The merged conv kernel equals the base conv plus PEFT's lora_B(lora_A(x)) * scale."""
    conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0))
    lora_a = nn.Conv2d(3, RANK, (3, 2), stride=(2, 1), padding=(1, 0), bias=False)
    lora_b = nn.Conv2d(RANK, 5, 1, bias=False)
    scale = 0.7
    delta = lora_delta("conv", lora_a.weight, lora_b.weight, RANK, scale)
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        got = F.conv2d(x, conv.weight + delta, conv.bias, conv.stride, conv.padding)
        want = conv(x) + lora_b(lora_a(x)) * scale
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_rslora_scaling(tmp_path: Path) -> None:
    net = Net().eval()
    lora = _save(tmp_path / "a", net, use_rslora=True)
    adapter = load_adapter(tmp_path / "a", "n", "1")
    assert adapter.scale == pytest.approx(ALPHA / math.sqrt(RANK))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        got = functional_call(net, merged_state(net, adapter), (x,), strict=False)
        want = _manual_forward(net, lora, ALPHA / math.sqrt(RANK), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_merge_keeps_the_weight_dtype(tmp_path: Path) -> None:
    net = Net()
    _save(tmp_path / "a", net)
    net = net.to(torch.bfloat16)
    merged = merged_state(net, load_adapter(tmp_path / "a", "n", "1"))
    assert all(t.dtype == torch.bfloat16 for t in merged.values())


def test_regex_target_modules(tmp_path: Path) -> None:
    _save(tmp_path / "a", Net(), target_modules=["0", "head"])
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = r"(features\.0|head)"
    config_path.write_text(json.dumps(config))
    assert load_adapter(tmp_path / "a", "n", "1").targets == ["features.0", "head"]
    config["target_modules"] = r"head"
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="not among target_modules"):
        load_adapter(tmp_path / "a", "n", "1")


# --- refusals -------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "adapter"
    _save(path, Net())
    return path


def _edit_config(path: Path, **changes: Any) -> None:
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    config_path.write_text(json.dumps(config))


def _edit_tensors(path: Path, change: Any) -> None:
    weights = path / "adapter_model.safetensors"
    tensors = dict(load_file(weights))
    change(tensors)
    save_file(tensors, weights)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "nope", "n", "1")


def test_missing_config(saved: Path) -> None:
    (saved / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"adapter config .* does not exist"):
        load_adapter(saved, "n", "1")


def test_missing_weights(saved: Path) -> None:
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"adapter weights .* do not exist"):
        load_adapter(saved, "n", "1")


def test_pickled_weights_are_not_read(saved: Path) -> None:
    # Only safetensors count: a PEFT .bin (pickle) beside the config is ignored, not loaded.
    (saved / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, saved / "adapter_model.bin")
    with pytest.raises(AdapterError, match="do not exist"):
        load_adapter(saved, "n", "1")


def test_corrupt_weights(saved: Path) -> None:
    (saved / "adapter_model.safetensors").write_bytes(b"\x00not safetensors at all")
    with pytest.raises(AdapterError, match="unreadable"):
        load_adapter(saved, "n", "1")


def test_bad_json(saved: Path) -> None:
    (saved / "adapter_config.json").write_text("{oops")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(saved, "n", "1")
    (saved / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match="must be a JSON object"):
        load_adapter(saved, "n", "1")


def test_bad_tenant_file(saved: Path) -> None:
    (saved / "tandem.json").write_text('{"tenant": 3}')
    with pytest.raises(AdapterError, match="'tenant' must be a string"):
        load_adapter(saved, "n", "1")
    (saved / "tandem.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match="must be a JSON object"):
        load_adapter(saved, "n", "1")
    (saved / "tandem.json").write_text("{oops")
    with pytest.raises(AdapterError, match=r"adapter metadata .* not valid JSON"):
        load_adapter(saved, "n", "1")


@pytest.mark.parametrize("peft_type", ["PREFIX_TUNING", "IA3", None, "lora"])
def test_wrong_peft_type(saved: Path, peft_type: str | None) -> None:
    _edit_config(saved, peft_type=peft_type)
    with pytest.raises(AdapterError, match="peft_type"):
        load_adapter(saved, "n", "1")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("fan_in_fan_out", True),
        ("bias", "all"),
        ("bias", "lora_only"),
        ("use_dora", True),
        ("rank_pattern", {"head": 2}),
        ("alpha_pattern", {"head": 2}),
        ("modules_to_save", ["classifier"]),
    ],
)
def test_unsupported_options(saved: Path, key: str, value: Any) -> None:
    _edit_config(saved, **{key: value})
    with pytest.raises(AdapterError, match=f"{key}=.* is not supported"):
        load_adapter(saved, "n", "1")


def test_neutral_options_are_accepted(saved: Path) -> None:
    # What PEFT writes when the options are off: nulls and empty collections.
    _edit_config(
        saved,
        rank_pattern={},
        alpha_pattern={},
        modules_to_save=None,
        layer_replication=None,
        use_dora=False,
        lora_dropout=0.1,
        task_type="FEATURE_EXTRACTION",
        init_lora_weights=True,
    )
    assert load_adapter(saved, "n", "1").rank == RANK


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": "4"}, "r must be a positive integer"),
        ({"r": ...}, "r must be a positive integer"),
        ({"lora_alpha": -1}, "lora_alpha must be a positive number"),
        ({"lora_alpha": True}, "lora_alpha must be a positive number"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"target_modules": []}, "target_modules must be"),
        ({"target_modules": ...}, "target_modules must be"),
        ({"target_modules": [1]}, "target_modules must be"),
        ({"target_modules": ["q_proj"]}, "not among target_modules"),
        ({"target_modules": "(head"}, "not a valid regex"),
    ],
)
def test_bad_config_values(saved: Path, changes: dict[str, Any], message: str) -> None:
    _edit_config(saved, **changes)
    with pytest.raises(AdapterError, match=message):
        load_adapter(saved, "n", "1")


@pytest.mark.parametrize("part", ["A", "B"])
def test_missing_pair_half(saved: Path, part: str) -> None:
    _edit_tensors(saved, lambda t: t.pop(f"base_model.model.head.lora_{part}.weight"))
    with pytest.raises(AdapterError, match=f"'head' has no lora_{part}"):
        load_adapter(saved, "n", "1")


def test_no_tensors(saved: Path) -> None:
    save_file({}, saved / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="no LoRA tensors"):
        load_adapter(saved, "n", "1")


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.head.lora_magnitude_vector",  # DoRA
        "base_model.model.head.lora_A.default.weight",  # adapter name left in
        "head.lora_A.weight",  # no PEFT prefix
        "base_model.model.head.base_layer.bias",
    ],
)
def test_unexpected_tensor(saved: Path, key: str) -> None:
    _edit_tensors(saved, lambda t: t.update({key: torch.zeros(3)}))
    with pytest.raises(AdapterError, match="unsupported tensor"):
        load_adapter(saved, "n", "1")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights(saved: Path, value: float) -> None:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors["base_model.model.head.lora_B.weight"][0, 0] = value

    _edit_tensors(saved, poison)
    with pytest.raises(AdapterError, match="non-finite"):
        load_adapter(saved, "n", "1")


def test_integer_weights(saved: Path) -> None:
    key = "base_model.model.head.lora_A.weight"
    _edit_tensors(saved, lambda t: t.update({key: t[key].to(torch.int32)}))
    with pytest.raises(AdapterError, match="int32"):
        load_adapter(saved, "n", "1")


def test_rank_mismatch(saved: Path) -> None:
    _edit_config(saved, r=RANK + 1)
    with pytest.raises(AdapterError, match=f"do not have rank r={RANK + 1}"):
        load_adapter(saved, "n", "1")


def test_inconsistent_pair_rank(saved: Path) -> None:
    key = "base_model.model.head.lora_B.weight"
    _edit_tensors(saved, lambda t: t.update({key: t[key][:, :2].contiguous()}))
    with pytest.raises(AdapterError, match="do not have rank"):
        load_adapter(saved, "n", "1")


def test_mixed_dimensions(saved: Path) -> None:
    key = "base_model.model.head.lora_B.weight"
    _edit_tensors(saved, lambda t: t.update({key: t[key][:, :, None, None].contiguous()}))
    with pytest.raises(AdapterError, match="neither a Linear"):
        load_adapter(saved, "n", "1")


def test_conv_b_must_be_1x1(saved: Path) -> None:
    key = "base_model.model.features.0.lora_B.weight"
    _edit_tensors(saved, lambda t: t.update({key: torch.randn(6, RANK, 3, 3)}))
    with pytest.raises(AdapterError, match="must be 1x1"):
        load_adapter(saved, "n", "1")


def test_save_refuses_rank_mismatch(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="do not have rank"):
        save_adapter(
            tmp_path / "a",
            lora={"head": (torch.randn(2, 8), torch.randn(3, 2))},
            rank=4,
            alpha=8,
            target_modules=["head"],
        )


# --- merging into a model that does not fit -----------------------------------------------


def _adapter(deltas: dict[str, torch.Tensor]) -> Adapter:
    return Adapter("n", "1", "", RANK, ALPHA, ALPHA / RANK, sorted(deltas), deltas)


def test_merge_missing_module() -> None:
    with pytest.raises(AdapterError, match=r"no module 'tail\.9'"):
        merged_state(Net(), _adapter({"tail.9.weight": torch.zeros(5, 96)}))


def test_merge_unsupported_module() -> None:
    with pytest.raises(AdapterError, match="ReLU, only Linear and Conv2d"):
        merged_state(Net(), _adapter({"features.1.weight": torch.zeros(1)}))


def test_merge_shape_mismatch(tmp_path: Path) -> None:
    _save(tmp_path / "a", Net())
    adapter = load_adapter(tmp_path / "a", "n", "1")
    other = Net()
    other.head = nn.Linear(96, 7)
    with pytest.raises(AdapterError, match=r"does not fit head.weight \(7, 96\)"):
        merged_state(other, adapter)


# --- discovery ---------------------------------------------------------------------------


def test_list_adapters(tmp_path: Path) -> None:
    net = Net()
    for name, version in [("style", "v2"), ("style", "v1"), ("acme-fix", "1")]:
        _save(tmp_path / "adapters" / name / version, net)
    (tmp_path / "adapters" / "empty" / "v1").mkdir(parents=True)  # no config: skipped
    (tmp_path / "adapters" / "README").write_text("not an adapter")
    assert list_adapters(tmp_path) == [
        ("acme-fix", "1", tmp_path / "adapters" / "acme-fix" / "1"),
        ("style", "v1", tmp_path / "adapters" / "style" / "v1"),
        ("style", "v2", tmp_path / "adapters" / "style" / "v2"),
    ]
    for name, version, path in list_adapters(tmp_path):
        assert load_adapter(path, name, version).name == name


def test_list_adapters_without_adapters_dir(tmp_path: Path) -> None:
    assert list_adapters(tmp_path) == []
