"""A user model's tail, carried as a ``torch.export`` graph: served with no user code and no
pickle.

A bundle cut from a model outside the zoo cannot be rebuilt by name in the cloud. Its tail is
exported with :func:`torch.export.export` (batch size dynamic) and stored as the program's
JSON only: ``tail.program.json`` holds the graph of ATen operators and its signature, while
the weights stay in ``tail.safetensors`` beside the decoder's, hash-checked like every
bundle file. Loading never runs ``torch.load`` (the ``.pt2`` archive's loader falls back to
unpickling) and never imports the module that defined the model.

Guarantees of :func:`load_program` on any input, hostile included:

- the text is at most :data:`MAX_PROGRAM_BYTES` and valid JSON;
- every operator is one of :data:`ATEN_OPERATORS` (pure tensor arithmetic: convolutions,
  linear layers, norms, activations, pooling, views; nothing that reads or writes files,
  prints, allocates by a size it is given, or mutates) or one of a few pure Python operators
  on shapes (:data:`PYTHON_OPERATORS`): no custom or higher-order operator;
- every other string in the program is a name (``[A-Za-z0-9_]`` parts joined by dots): the
  names become generated Python code when the tail is built, so a name that is anything
  else is refused; the input and output tree specs must be exactly those of one tensor in,
  one tensor out; the batch symbols' ranges are named ``s`` and a few digits;
- every symbolic shape is integer arithmetic (``Mul``, ``Add``, ``Min``, ...) on batch
  symbols and integers (:func:`_is_shape_expr`): the deserializer hands shape expressions
  to ``sympy.sympify``, which evaluates Python, so nothing else reaches it;
- the program has no guard code (which ``ExportedProgram.module()`` would compile), no
  custom objects, no inputs but parameters, persistent buffers and the one feature tensor,
  and one output;
- node metadata (stack traces, module paths) is dropped before deserializing.

What fails any check is a :class:`ProgramError` naming it. The loaded tail is built on the
meta device: its weights come from the state dict afterwards, as for a zoo tail.

Parts of ``torch._export.serde`` are private: the serialization format is versioned by
``schema_version`` and the torch pin (``<2.14``) keeps reader and writer together; a round
trip test fails when either moves.
"""

from __future__ import annotations

import json
import re
import warnings
from typing import Any

import torch
from torch import nn
from torch._export.serde import serialize as serde
from torch._export.serde.schema import ScalarType
from torch.export import Dim, export
from torch.utils import _pytree as pytree

from tandem.profile import evaluating

MAX_PROGRAM_BYTES = 32 << 20
"""A tail's program is tens of KB (about 60 KB for a ResNet-18's last two stages); a larger
one is refused unread."""
PYTHON_OPERATORS = frozenset(
    f"_operator.{name}" for name in ("getitem", "add", "sub", "mul", "floordiv", "neg")
)
ATEN_OPERATORS = frozenset(
    {
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "add", "addmm",
        "alias", "amax", "avg_pool2d", "batch_norm", "bmm", "cat", "chunk", "clamp", "clamp_max",
        "clamp_min", "clone", "contiguous", "conv1d", "conv2d", "div", "dropout", "elu", "erf",
        "exp", "expand", "flatten", "gelu", "group_norm", "hardsigmoid", "hardswish", "hardtanh",
        "instance_norm", "layer_norm", "leaky_relu", "linear", "log_softmax", "matmul",
        "max_pool2d", "mean", "mm", "mul", "neg", "permute", "pow", "relu", "reshape", "rsqrt",
        "scaled_dot_product_attention", "select", "sigmoid", "silu", "slice", "softmax", "split",
        "split_with_sizes", "sqrt", "squeeze", "stack", "sub", "sum", "sym_size", "t", "tanh",
        "transpose", "unbind", "unflatten", "unsqueeze", "view",
    }
)  # fmt: skip
"""The ATen operators a tail may call (by name, any overload): what the zoo's and common
feed-forward tails export to. Anything else (``aten.from_file``, ``aten.full``, ``_print``,
an in-place operator) is refused by name."""
_ATEN = "torch.ops.aten."
# Shape expressions as torch.export writes them (sympy's srepr): a batch symbol, integers,
# and arithmetic on them. A leaf is reduced to "X", then an operator applied to X's, until
# nothing changes: only a text that reduces to one "X" is accepted.
_LEAF = re.compile(
    r"Symbol\('s\d+', positive=True, integer=True\)|Integer\(-?\d+\)|\bs\d+\b|\b\d+\b"
)
_APPLIED = re.compile(r"(?:Mul|Add|Min|Max|FloorDiv|Mod|CleanDiv)\(X(?:, X)*\)|X\*X")
_MAX_EXPR_CHARS = 1000
_NAME = re.compile(r"^[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*$")
_SYMBOL_NAME = re.compile(r"^s\d{1,5}$")
_VERSION = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")
# One tensor in (as the only positional argument), one tensor out.
_IN_SPEC = pytree.treespec_dumps(pytree.tree_structure(((torch.zeros(()),), {})))
_OUT_SPEC = pytree.treespec_dumps(pytree.tree_structure(torch.zeros(())))
_INPUT_KINDS = frozenset({"parameter", "buffer", "user_input"})


class ProgramError(ValueError):
    """An exported tail program that cannot be made, or that the loader refuses."""


def export_program(tail: nn.Module, cut_shape: tuple[int, ...]) -> bytes:
    """The JSON program of ``tail`` (in eval mode) for features of ``cut_shape`` (C, H, W),
    any batch size; without weights, metadata or example inputs.

    Raises :class:`ProgramError` when ``torch.export`` cannot capture the tail, or when it
    captures something :func:`load_program` would refuse (an operator outside
    :data:`ATEN_OPERATORS`, a non-persistent buffer, say): the program is loaded back here.
    """
    example = torch.zeros(2, *cut_shape)  # 2, not 1: a size-1 batch would be specialised
    try:
        with evaluating(tail):
            program = export(tail, (example,), dynamic_shapes=({0: Dim("batch", min=1)},))
        artifact = serde.serialize(
            program,
            serialize_state_dict=False,
            serialize_constants=False,
            serialize_example_inputs=False,
        )
    except Exception as exc:  # torch.export's errors are many and change between releases
        raise ProgramError(f"torch.export cannot capture the tail: {exc}") from exc
    doc = json.loads(artifact.exported_program)
    _strip_metadata(doc)
    text = json.dumps(doc, separators=(",", ":")).encode()
    load_program(text)  # what the cloud will refuse is refused here, where it is made
    return text


def load_program(text: bytes) -> nn.Module:
    """The tail that ``text`` (from :func:`export_program`) describes, on the meta device:
    move it with ``to_empty`` and load its weights. :class:`ProgramError` says why a text is
    refused (see the module's guarantees)."""
    if len(text) > MAX_PROGRAM_BYTES:
        raise ProgramError(f"the tail program has {len(text)} bytes, over {MAX_PROGRAM_BYTES}")
    try:
        doc = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProgramError(f"the tail program is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("graph_module"), dict):
        raise ProgramError("the tail program has no graph_module")
    _strip_metadata(doc)
    _check(doc)
    try:
        state = _meta_state(doc)
    except (TypeError, AttributeError, KeyError, ValueError, StopIteration) as exc:
        raise ProgramError(f"the tail program's weights are malformed: {exc!r}") from None
    artifact = serde.SerializedArtifact(json.dumps(doc).encode(), state, b"", b"")  # type: ignore[arg-type]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations
            return serde.deserialize(artifact).module()
    except Exception as exc:  # a malformed graph fails deep inside the deserializer
        raise ProgramError(f"the tail program does not load: {exc}") from None


def _strip_metadata(doc: dict[str, Any]) -> None:
    """Drop every node's metadata: stack traces and module paths are of no use to serve,
    name the user's files, and are strings the deserializer would otherwise interpret."""
    for node in _nodes(doc):
        node["metadata"] = {}


def _nodes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    graph = doc["graph_module"].get("graph")
    nodes = graph.get("nodes") if isinstance(graph, dict) else None
    if not isinstance(nodes, list) or not all(isinstance(n, dict) for n in nodes):
        raise ProgramError("the tail program has no list of nodes")
    return nodes


def _check(doc: dict[str, Any]) -> None:
    """Refuse anything outside what a plain feed-forward tail exports to (see the module)."""
    if doc.get("guards_code"):
        raise ProgramError("the tail program carries guard code; it is not loaded")
    graph = doc["graph_module"]["graph"]
    if graph.get("custom_obj_values"):
        raise ProgramError("the tail program holds custom objects; it is not loaded")
    for node in _nodes(doc):
        _check_target(node.get("target"))
    _check_strings(doc)
    _check_ranges(doc.get("range_constraints"))
    _check_signature(doc)


def _check_target(target: Any) -> None:
    """An allowed ATen operator (any overload) or pure Python operator; ProgramError if not."""
    if isinstance(target, str) and target in PYTHON_OPERATORS:
        return
    if isinstance(target, str) and target.startswith(_ATEN):
        name = target[len(_ATEN) :].split(".")[0]
        if name in ATEN_OPERATORS:
            return
    raise ProgramError(f"the tail program calls {target!r}, which is not among the operators "
                       "a tail may call (tandem.exported.ATEN_OPERATORS)")  # fmt: skip


def _check_strings(tree: Any, key: str = "") -> None:
    """Every string of the program, keys included, is a name, or the one kind of text its
    key holds (a shape expression, a tree spec, a version); ProgramError names the first
    that is not. Names become generated code when the tail is built: nothing else may."""
    stack: list[tuple[str, Any]] = [(key, tree)]
    while stack:
        key, item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if not (isinstance(k, str) and (k == "" or _NAME.match(k))):
                    raise ProgramError(f"the tail program has the key {k!r}")
                stack.append((k, v))
        elif isinstance(item, list):
            stack.extend((key, v) for v in item)
        elif isinstance(item, str) and not _allowed_text(key, item):
            raise ProgramError(f"the tail program's {key} is {item[:80]!r}")


def _allowed_text(key: str, text: str) -> bool:
    """Whether ``text``, stored under ``key``, is what that key may hold."""
    if key == "expr_str":
        return _is_shape_expr(text)
    if key == "in_spec":
        return text == _IN_SPEC
    if key == "out_spec":
        return text == _OUT_SPEC
    if key == "torch_version":
        return bool(_VERSION.match(text))
    return text == "" or bool(_NAME.match(text))


def _check_ranges(ranges: Any) -> None:
    """The batch symbols' ranges: a few ``sN`` names with integer bounds (torch's
    deserializer creates a symbol per name, and other prefixes can make it loop)."""
    if not isinstance(ranges, dict) or len(ranges) > 8:
        raise ProgramError("the tail program's range constraints are malformed")
    for name, bounds in ranges.items():
        if not _SYMBOL_NAME.match(name) or not isinstance(bounds, dict):
            raise ProgramError(f"the tail program has the symbol {name!r}")
        for bound in bounds.values():
            if not (bound is None or (isinstance(bound, int) and not isinstance(bound, bool))):
                raise ProgramError(f"the symbol {name!r} has the bound {bound!r}")


def _check_signature(doc: dict[str, Any]) -> None:
    """Inputs: parameters, persistent buffers and one feature tensor; one output."""
    users = 0
    for spec in _input_specs(doc):
        kinds = set(spec) if isinstance(spec, dict) else set()
        if len(kinds) != 1 or not kinds <= _INPUT_KINDS:
            raise ProgramError(f"the tail program takes an input of kind {sorted(kinds)}")
        kind, body = next(iter(spec.items()))
        users += kind == "user_input"
        if kind == "buffer" and not (isinstance(body, dict) and body.get("persistent")):
            name = body.get("buffer_name") if isinstance(body, dict) else None
            raise ProgramError(
                f"the tail's buffer {name!r} is not persistent, so its weights file would "
                "not hold it: register it with persistent=True"
            )
    outputs = doc["graph_module"]["signature"].get("output_specs")
    if users != 1 or not (
        isinstance(outputs, list) and len(outputs) == 1 and set(outputs[0]) == {"user_output"}
    ):
        raise ProgramError("the tail program must take one tensor and return one")


def _is_shape_expr(expr: str) -> bool:
    """Whether ``expr`` is integer arithmetic on batch symbols and nothing else."""
    if len(expr) > _MAX_EXPR_CHARS or "X" in expr:  # "X" is the reduction's own mark
        return False
    reduced = _LEAF.sub("X", expr)
    while True:
        shorter = _APPLIED.sub("X", reduced)
        if shorter == reduced:
            return reduced == "X"
        reduced = shorter


def _input_specs(doc: dict[str, Any]) -> list[Any]:
    signature = doc["graph_module"].get("signature")
    specs = signature.get("input_specs") if isinstance(signature, dict) else None
    if not isinstance(specs, list):
        raise ProgramError("the tail program has no input signature")
    return specs


def _meta_state(doc: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Meta-device placeholders for the program's parameters and buffers, shaped as its
    tensor table says: the deserializer needs them, and they cost no memory."""
    values = doc["graph_module"]["graph"].get("tensor_values", {})
    state: dict[str, torch.Tensor] = {}
    for spec in _input_specs(doc):
        kind, body = next(iter(spec.items()))
        if kind == "user_input":
            continue
        name = body.get("parameter_name") or body.get("buffer_name")
        meta = values.get(body.get("arg", {}).get("name"))
        if not isinstance(name, str) or not isinstance(meta, dict):
            raise ProgramError(f"the tail program's {kind} input is malformed")
        shape = [_static(size) for size in meta.get("sizes", [])]
        dtype = _dtype(name, meta.get("dtype"))
        tensor = torch.empty(shape, dtype=dtype, device="meta")
        state[name] = nn.Parameter(tensor, requires_grad=False) if kind == "parameter" else tensor
    return state


def _dtype(name: str, code: Any) -> torch.dtype:
    """The torch dtype of serialized scalar type ``code``: real types only."""
    try:
        dtype = serde.deserialize_scalar_type(ScalarType(code))
    except (ValueError, KeyError):
        dtype = None
    if dtype is None or dtype.is_complex:
        raise ProgramError(f"{name} has an unsupported dtype {code!r}")
    return dtype


def _static(size: Any) -> int:
    """A weight's dimension: weights have no batch dimension, so every one is an integer."""
    value = size.get("as_int") if isinstance(size, dict) else None
    if not isinstance(value, int) or value < 0:
        raise ProgramError(f"a weight of the tail program has the dimension {size!r}")
    return value
