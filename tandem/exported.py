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
- every operator is an ATen operator (``torch.ops.aten.*``) or one of a few pure Python
  operators on shapes (:data:`PYTHON_OPERATORS`): no custom or higher-order operator;
- every symbolic shape is integer arithmetic (``Mul``, ``Add``, ``Min``, ...) on batch
  symbols and integers (:func:`_is_shape_expr`): the deserializer hands shape expressions
  to ``sympy.sympify``, which evaluates Python, so nothing else reaches it;
- the program has no guard code (which ``ExportedProgram.module()`` would compile), no
  custom objects and no inputs but parameters, buffers and the one feature tensor;
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
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch._export.serde import serialize as serde
from torch._export.serde.schema import ScalarType
from torch.export import Dim, export

MAX_PROGRAM_BYTES = 32 << 20
"""A tail's program is tens of KB (about 60 KB for a ResNet-18's last two stages); a larger
one is refused unread."""
PYTHON_OPERATORS = frozenset(
    f"_operator.{name}" for name in ("getitem", "add", "sub", "mul", "floordiv", "neg")
)
_ATEN = "torch.ops.aten."
# Shape expressions as torch.export writes them (sympy's srepr): a batch symbol, integers,
# and arithmetic on them. A leaf is reduced to "X", then an operator applied to X's, until
# nothing changes: only a text that reduces to one "X" is accepted.
_LEAF = re.compile(
    r"Symbol\('s\d+', positive=True, integer=True\)|Integer\(-?\d+\)|\bs\d+\b|\b\d+\b"
)
_APPLIED = re.compile(r"(?:Mul|Add|Min|Max|FloorDiv|Mod|CleanDiv)\(X(?:, X)*\)|X\*X")
_MAX_EXPR_CHARS = 1000
_INPUT_KINDS = frozenset({"parameter", "buffer", "user_input"})


class ProgramError(ValueError):
    """An exported tail program that cannot be made, or that the loader refuses."""


def export_program(tail: nn.Module, cut_shape: tuple[int, ...]) -> bytes:
    """The JSON program of ``tail`` (in eval mode) for features of ``cut_shape`` (C, H, W),
    any batch size; without weights, metadata or example inputs.

    Raises :class:`ProgramError` when ``torch.export`` cannot capture the tail, or when it
    captures something :func:`load_program` would refuse (a custom operator, say).
    """
    was_training = tail.training
    tail.eval()
    example = torch.zeros(2, *cut_shape)  # 2, not 1: a size-1 batch would be specialised
    try:
        program = export(tail, (example,), dynamic_shapes=({0: Dim("batch", min=1)},))
        artifact = serde.serialize(
            program,
            serialize_state_dict=False,
            serialize_constants=False,
            serialize_example_inputs=False,
        )
    except Exception as exc:  # torch.export's errors are many and change between releases
        raise ProgramError(f"torch.export cannot capture the tail: {exc}") from exc
    finally:
        tail.train(was_training)
    doc = json.loads(artifact.exported_program)
    _strip_metadata(doc)
    _check(doc)
    return json.dumps(doc, separators=(",", ":")).encode()


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
    state = _meta_state(doc)
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
        target = node.get("target")
        if not isinstance(target, str) or not (
            target.startswith(_ATEN) or target in PYTHON_OPERATORS
        ):
            raise ProgramError(f"the tail program calls {target!r}: only ATen operators load")
    for expr in _values_of(doc, "expr_str"):
        if not isinstance(expr, str) or not _is_shape_expr(expr):
            raise ProgramError(f"the tail program has the shape expression {expr!r}")
    for spec in _input_specs(doc):
        kinds = set(spec) if isinstance(spec, dict) else set()
        if len(kinds) != 1 or not kinds <= _INPUT_KINDS:
            raise ProgramError(f"the tail program takes an input of kind {sorted(kinds)}")


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


def _values_of(tree: Any, key: str) -> Iterator[Any]:
    """Every value stored under ``key`` anywhere in a JSON tree."""
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if k == key:
                    yield v
                stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)


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
