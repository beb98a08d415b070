"""Exported tails: the program round-trips exactly, and hostile programs are refused unread
by the parts of torch that would execute them (see tandem/exported.py's guarantees)."""

from __future__ import annotations

import copy
import json
import pickle
from typing import Any

import pytest
import torch
from torch import nn

from tandem.exported import MAX_PROGRAM_BYTES, ProgramError, export_program, load_program
from tandem.models import build_model
from tandem.split import split_model


def _loaded(program: bytes, state: dict[str, torch.Tensor]) -> nn.Module:
    tail = copy.deepcopy(load_program(program)).to_empty(device="cpu")
    tail.load_state_dict(state, strict=True)
    return tail.eval()


# A convolutional tail exports to the very kernels it runs: equal results. A ViT's
# nn.MultiheadAttention runs a fused kernel eagerly and exports as linear layers plus
# scaled_dot_product_attention: equal to float32 rounding.
@pytest.mark.parametrize(
    ("arch", "args", "cut", "shape", "exact"),
    [
        ("resnet18", {"width": 0.25, "small_input": True}, "layer2", (3, 32, 32), True),
        ("mobilenet_v2", {"width": 0.25}, "features.7", (3, 64, 64), True),
        (
            "vit_small",
            {"depth": 2, "width": 0.25, "image_size": 32, "patch_size": 8},
            "encoder.layers.encoder_layer_0",
            (3, 32, 32),
            False,
        ),
    ],
)
def test_a_tail_exported_and_loaded_computes_what_the_traced_tail_does(
    arch: str, args: dict[str, Any], cut: str, shape: tuple[int, ...], exact: bool
) -> None:
    model = build_model(arch, num_classes=10, **args).eval()
    parts = split_model(model, cut)
    x = torch.randn(5, *shape)
    with torch.no_grad():
        features = parts.head(x)
        program = export_program(parts.tail, tuple(features.shape[1:]))
        tail = _loaded(program, parts.tail.state_dict())
        for rows in (1, 5):  # the batch is dynamic, a single row included
            got, want = tail(features[:rows]), parts.tail(features[:rows])
            if exact:
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_loading_never_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("resnet18", num_classes=10, width=0.25, small_input=True).eval()
    parts = split_model(model, "layer3")
    program = export_program(parts.tail, (64, 8, 8))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    _loaded(program, parts.tail.state_dict())


@pytest.fixture(scope="module")
def program() -> dict[str, Any]:
    model = build_model("resnet18", num_classes=10, width=0.25, small_input=True).eval()
    doc = json.loads(export_program(split_model(model, "layer3").tail, (64, 8, 8)))
    assert isinstance(doc, dict)
    return doc


def _mutated(doc: dict[str, Any], change: Any) -> bytes:
    copied = copy.deepcopy(doc)
    change(copied)
    return json.dumps(copied).encode()


def _first_node(doc: dict[str, Any]) -> dict[str, Any]:
    node = doc["graph_module"]["graph"]["nodes"][0]
    assert isinstance(node, dict)
    return node


def _first_weight(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["graph_module"]["signature"]["input_specs"][0]["parameter"]
    assert isinstance(spec, dict)
    return spec


def _forward_signature(doc: dict[str, Any]) -> dict[str, Any]:
    (top,) = [e for e in doc["graph_module"]["module_call_graph"] if e["fqn"] == ""]
    signature = top["signature"]
    assert isinstance(signature, dict)
    return signature


def _graph(doc: dict[str, Any]) -> dict[str, Any]:
    graph = doc["graph_module"]["graph"]
    assert isinstance(graph, dict)
    return graph


def _set_shape_expr(doc: dict[str, Any], expr: str) -> None:
    constraints = doc["range_constraints"]
    values = doc["graph_module"]["graph"]["tensor_values"]
    for meta in values.values():
        for size in meta["sizes"]:
            if "as_expr" in size:
                size["as_expr"]["expr_str"] = expr
                return
    raise AssertionError(f"no symbolic size in the program ({constraints})")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(guards_code=["__import__('os').system('true')"]), "guard code"),
        (lambda d: _first_node(d).update(target="builtins.exec"), "'builtins.exec'"),
        (lambda d: _first_node(d).update(target="torch.ops.evil.run.default"), "not among"),
        # Reads a file into the logits: ATen, but not an operator a tail may call.
        (lambda d: _first_node(d).update(target="torch.ops.aten.from_file.default"), "not among"),
        (lambda d: _first_node(d).update(target="torch.ops.aten.full.default"), "not among"),
        (lambda d: _set_shape_expr(d, "__import__('os').getcwd()"), "expr_str is"),
        # Names become generated code when the tail is built.
        (
            lambda d: _first_weight(d).update(parameter_name='x") or __import__("os").getpid("'),
            "parameter_name is",
        ),
        (
            lambda d: _forward_signature(d).update(forward_arg_names=["x=print(1)"]),
            "forward_arg_names is",
        ),
        (
            lambda d: _forward_signature(d).update(in_spec='[1, {"type": "os.system"}]'),
            "in_spec is",
        ),
        # A symbol of another prefix makes torch's deserializer count up to its number.
        (
            lambda d: d["range_constraints"].update(u100000000={"min_val": 0, "max_val": 9}),
            "symbol 'u100000000'",
        ),
        (lambda d: _first_weight(d).update(arg=5), "weights are malformed"),
        (
            lambda d: d["graph_module"]["graph"].update(custom_obj_values={"x": {}}),
            "custom objects",
        ),
        (
            lambda d: d["graph_module"]["signature"]["input_specs"].insert(0, {"custom_obj": {}}),
            "kind ['custom_obj']",
        ),
        (lambda d: d.pop("graph_module"), "no graph_module"),
    ],
)
def test_a_hostile_program_is_refused_with_the_reason(
    program: dict[str, Any], change: Any, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sympy

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a refused program reached sympy")

    monkeypatch.setattr(sympy, "sympify", refuse)
    with pytest.raises(ProgramError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_program(_mutated(program, change))


def test_what_is_not_json_or_too_long_is_refused_unparsed() -> None:
    with pytest.raises(ProgramError, match="not JSON"):
        load_program(b"\x80\x04K\x01.")  # a pickle
    with pytest.raises(ProgramError, match="over"):
        load_program(b" " * (MAX_PROGRAM_BYTES + 1))


def test_metadata_is_dropped_so_no_user_path_or_class_travels(program: dict[str, Any]) -> None:
    text = json.dumps(program)
    assert "stack_trace" not in text and "nn_module_stack" not in text
    assert all(node["metadata"] == {} for node in program["graph_module"]["graph"]["nodes"])


def test_a_tail_whose_weights_file_would_lack_a_buffer_is_refused_when_exported() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.ones(4, 1, 1), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * self.scale).mean((2, 3))

    with pytest.raises(ProgramError, match="'scale' is not persistent"):
        export_program(Scaled(), (4, 2, 2))


def test_a_tail_torch_export_cannot_capture_is_a_program_error() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(ProgramError, match="cannot capture"):
        export_program(Branchy(), (4, 2, 2))
