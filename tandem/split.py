"""Cut an fx-traceable model into a head and a tail where exactly one tensor crosses.

The model is traced once with a tracer that remembers which graph node each module call
produced, so cut points can be named by module path ("layer2", "features.3") rather than by
fx node name. A node is a valid cut when, after it runs, it is the only value the rest of the
graph still needs. Values that do not depend on the input (parameters, buffers and anything
computed only from them, such as an expanded class token) never count as crossing: the tail
re-creates them from its own copy of the weights.
"""

from __future__ import annotations

import difflib
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

__all__ = [
    "CutPoint",
    "SplitError",
    "SplitModel",
    "TracedModel",
    "UnknownCutError",
    "list_cut_points",
    "parameter_names",
    "resolve_cut",
    "split_model",
    "trace_model",
]

# Tensor methods whose result is a Python scalar or tuple, never a tensor.
_SCALAR_METHODS = frozenset(
    {"size", "dim", "numel", "nelement", "element_size", "item", "tolist", "stride"}
)
_OPERATOR_MODULES = frozenset({"operator", "_operator"})
_MAX_LISTED_NAMES = 12


class SplitError(ValueError):
    """Raised when a model cannot be cut at the requested place."""


class UnknownCutError(SplitError):
    """Raised when a cut name matches no module path or graph node of the model."""


@dataclass(frozen=True)
class CutPoint:
    """A place where the model can be cut.

    ``name`` is the shortest module path whose output is the cut tensor (or the fx node name
    when no module ends there), ``node`` the fx node name, ``aliases`` every other name that
    refers to the same place, and ``index`` the position among the model's cut points in
    execution order.
    """

    name: str
    node: str
    aliases: tuple[str, ...]
    index: int

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that refers to this cut point, the friendly name first."""
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class SplitModel:
    """A model cut in two: ``tail(head(x))`` computes ``model(x)``.

    Both halves are ``fx.GraphModule``s that hold only the submodules they call, under their
    original qualified names, and share those submodules with the original model.
    """

    head: fx.GraphModule
    tail: fx.GraphModule
    cut: CutPoint

    def unreferenced(self, model: nn.Module) -> frozenset[str]:
        """Return the model's state-dict keys that neither half holds."""
        return parameter_names(model) - parameter_names(self.head) - parameter_names(self.tail)


def parameter_names(module: nn.Module) -> frozenset[str]:
    """Return the state-dict keys (parameters and buffers) of ``module``."""
    return frozenset(module.state_dict().keys())


class _NamingTracer(fx.Tracer):
    """A tracer that records, for every module call, the graph node of its output."""

    def __init__(self) -> None:
        """Start with no recorded module calls."""
        super().__init__()
        self.module_outputs: dict[str, list[fx.Node]] = defaultdict(list)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Trace the call as usual, then note which node the module's output is."""
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy):
            self.module_outputs[self.path_of_module(m)].append(out.node)
        return out


class TracedModel:
    """A model traced once, with its cut points, names and liveness analysed.

    Use it to split one model at several places without tracing it again.
    """

    def __init__(self, model: nn.Module) -> None:
        """Trace ``model`` symbolically; nothing is executed, so meta-device models work."""
        tracer = _NamingTracer()
        graph = tracer.trace(model)
        self.model = model
        self.graph_module = fx.GraphModule(model, graph, class_name=type(model).__name__)
        self.nodes: list[fx.Node] = list(graph.nodes)
        self._order = {node: i for i, node in enumerate(self.nodes)}
        self._node_by_name = {node.name: node for node in self.nodes}
        self._constant = _constant_nodes(self.nodes)
        self._live_after = _live_values(self.nodes, self._order, self._constant)
        self._tensor_like = _tensor_like_nodes(self.nodes)
        self._by_name, self._ambiguous = _index_module_paths(tracer.module_outputs)
        self._paths = _paths_by_node(self._by_name)
        self.cut_points = self._find_cut_points()
        self._cut_by_node = {cut.node: cut for cut in self.cut_points}

    def label(self, node: fx.Node) -> str:
        """Return the friendly name of ``node``: its shortest module path, or its own name."""
        paths = self._paths.get(node)
        return paths[0] if paths else node.name

    def resolve(self, name: str) -> CutPoint:
        """Return the cut point that ``name`` (module path, alias or node name) refers to.

        Raises ``UnknownCutError`` for a name that matches nothing and ``SplitError`` for a
        place where more than one value would cross, naming the nearest valid cuts.
        """
        node = self._lookup(name)
        cut = self._cut_by_node.get(node.name)
        if cut is None:
            raise SplitError(self._explain_invalid(name, node))
        return cut

    def split(self, cut: str | CutPoint) -> SplitModel:
        """Cut the model at ``cut`` into a head and a tail."""
        point = self.resolve(cut.node if isinstance(cut, CutPoint) else cut)
        node = self._node_by_name[point.node]
        return SplitModel(head=self._build_head(node), tail=self._build_tail(node), cut=point)

    def _find_cut_points(self) -> list[CutPoint]:
        """Return every valid cut point in execution order."""
        cuts: list[CutPoint] = []
        for node in self.nodes:
            if self._is_valid_cut(node):
                name = self.label(node)
                every = (*self._paths.get(node, ()), node.name)
                others = tuple(alias for alias in every if alias != name)
                cuts.append(CutPoint(name=name, node=node.name, aliases=others, index=len(cuts)))
        return cuts

    def _is_valid_cut(self, node: fx.Node) -> bool:
        """Whether ``node`` is the one value alive after it runs, and a tensor."""
        return (
            node.op not in ("placeholder", "output")
            and node not in self._constant
            and self._live_after[node] == (node,)
            and self._tensor_like[node]
        )

    def _lookup(self, name: str) -> fx.Node:
        """Map a module path or node name to its graph node."""
        if name in self._ambiguous:
            nodes = ", ".join(n.name for n in self._ambiguous[name])
            raise SplitError(
                f"{name!r} is called more than once ({nodes}); name one of those nodes instead"
            )
        node = self._by_name.get(name) or self._node_by_name.get(name)
        if node is None:
            raise UnknownCutError(self._explain_unknown(name))
        return node

    def _explain_unknown(self, name: str) -> str:
        """Describe an unknown cut name, with close matches and some valid names."""
        valid = [cut.name for cut in self.cut_points]
        every = [alias for cut in self.cut_points for alias in cut.names]
        close = difflib.get_close_matches(name, every, n=3)
        hint = f" Did you mean {_quoted(close)}?" if close else ""
        return (
            f"unknown cut point {name!r}.{hint} "
            f"Valid cut points ({len(valid)}): {_quoted(valid, _MAX_LISTED_NAMES)}"
        )

    def _explain_invalid(self, name: str, node: fx.Node) -> str:
        """Say why ``node`` cannot be a cut and which valid cuts are nearest to it."""
        if node.op == "placeholder":
            reason = "it is a model input; the head must contain at least one operation"
        elif node.op == "output":
            reason = "it is the model output node; cut at the node that feeds it"
        elif node in self._constant:
            reason = "its value does not depend on the input"
        elif self._live_after[node] != (node,):
            crossing = [self.label(n) for n in self._live_after[node]]
            reason = f"{len(crossing)} values would cross the cut: {_quoted(crossing)}"
        else:
            reason = "its value is not a single tensor"
        before, after = self._nearest_cuts(node)
        return (
            f"cannot cut at {name!r} (node {node.name}): {reason}. Nearest valid cut points: "
            f"before: {_quoted_or_none(before)}, after: {_quoted_or_none(after)}"
        )

    def _nearest_cuts(self, node: fx.Node) -> tuple[CutPoint | None, CutPoint | None]:
        """Return the last valid cut before ``node`` and the first after it."""
        position = self._order[node]
        before = [c for c in self.cut_points if self._position(c) < position]
        after = [c for c in self.cut_points if self._position(c) > position]
        return (before[-1] if before else None, after[0] if after else None)

    def _position(self, cut: CutPoint) -> int:
        """Return the execution position of a cut point's node."""
        return self._order[self._node_by_name[cut.node]]

    def _build_head(self, cut: fx.Node) -> fx.GraphModule:
        """Copy the input placeholders and everything ``cut`` depends on into a new graph."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        needed = _ancestors([cut])
        for node in self.nodes[: self._order[cut] + 1]:
            if node.op == "placeholder" or node in needed:
                env[node] = graph.node_copy(node, env.__getitem__)
        graph.output(env[cut])
        return self._graph_module(graph, "Head")

    def _build_tail(self, cut: fx.Node) -> fx.GraphModule:
        """Copy everything after ``cut`` that the output needs, fed by a new placeholder."""
        graph = fx.Graph()
        env = {cut: graph.placeholder(cut.name)}
        needed = _ancestors([self.nodes[-1]], stop=cut) - {cut}
        for node in self.nodes:
            if node in needed:
                env[node] = graph.node_copy(node, env.__getitem__)
        return self._graph_module(graph, "Tail")

    def _graph_module(self, graph: fx.Graph, suffix: str) -> fx.GraphModule:
        """Wrap ``graph``; only the submodules and tensors it references are copied over."""
        module = fx.GraphModule(self.model, graph, class_name=type(self.model).__name__ + suffix)
        # Non-recursive on purpose: the shared submodules keep whatever mode they are in.
        module.training = self.model.training
        return module


def trace_model(model: nn.Module) -> TracedModel:
    """Trace ``model`` once for repeated cut-point queries and splits."""
    return TracedModel(model)


def list_cut_points(model: nn.Module) -> list[CutPoint]:
    """Return the model's valid cut points in execution order."""
    return TracedModel(model).cut_points


def resolve_cut(model: nn.Module, name: str) -> CutPoint:
    """Return the cut point that ``name`` refers to; see ``TracedModel.resolve``."""
    return TracedModel(model).resolve(name)


def split_model(model: nn.Module, cut: str | CutPoint) -> SplitModel:
    """Cut ``model`` at ``cut`` (any name of a cut point) into a head and a tail."""
    return TracedModel(model).split(cut)


def _constant_nodes(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """Return the nodes whose value does not depend on any placeholder."""
    constant: set[fx.Node] = set()
    for node in nodes:
        if node.op == "get_attr" or (
            node.op.startswith("call_") and all(n in constant for n in node.all_input_nodes)
        ):
            constant.add(node)
    return constant


def _live_values(
    nodes: list[fx.Node], order: dict[fx.Node, int], constant: set[fx.Node]
) -> dict[fx.Node, tuple[fx.Node, ...]]:
    """For each node, the input-dependent values still needed after it runs, oldest first."""
    live: dict[fx.Node, None] = {}  # an insertion-ordered set
    expiring: dict[int, list[fx.Node]] = defaultdict(list)
    result: dict[fx.Node, tuple[fx.Node, ...]] = {}
    for position, node in enumerate(nodes):
        last_use = max((order[user] for user in node.users), default=position)
        if node not in constant and last_use > position:
            live[node] = None
            expiring[last_use].append(node)
        for value in expiring.pop(position, []):
            del live[value]
        result[node] = tuple(live)
    return result


def _tensor_like_nodes(nodes: Iterable[fx.Node]) -> dict[fx.Node, bool]:
    """Guess, without running the graph, which nodes produce a single tensor.

    Shape queries and arithmetic on their results are Python values; a node consumed only
    through integer indexing is a tuple or list (e.g. ``nn.MultiheadAttention``'s output).
    """
    tensor_like: dict[fx.Node, bool] = {}
    for node in nodes:
        tensor_like[node] = (
            not _is_scalar_query(node)
            and not _is_scalar_arithmetic(node, tensor_like)
            and not _is_container(node)
        )
    return tensor_like


def _is_scalar_query(node: fx.Node) -> bool:
    """Whether ``node`` reads a tensor attribute (``x.shape``) or calls a scalar method."""
    if node.op == "call_method":
        return node.target in _SCALAR_METHODS
    return node.op == "call_function" and node.target is getattr


def _is_scalar_arithmetic(node: fx.Node, tensor_like: dict[fx.Node, bool]) -> bool:
    """Whether ``node`` applies a Python operator to non-tensor values only."""
    module = getattr(node.target, "__module__", None)
    return (
        node.op == "call_function"
        and module in _OPERATOR_MODULES
        and not any(tensor_like[n] for n in node.all_input_nodes)
    )


def _is_container(node: fx.Node) -> bool:
    """Whether every use of ``node`` picks an element out of it by integer index."""
    return bool(node.users) and all(
        user.op == "call_function"
        and user.target is operator.getitem
        and isinstance(user.args[1], int)
        for user in node.users
    )


def _index_module_paths(
    module_outputs: dict[str, list[fx.Node]],
) -> tuple[dict[str, fx.Node], dict[str, list[fx.Node]]]:
    """Split module paths into those with one output node and those called repeatedly."""
    unique: dict[str, fx.Node] = {}
    ambiguous: dict[str, list[fx.Node]] = {}
    for path, outputs in module_outputs.items():
        distinct = list(dict.fromkeys(outputs))
        if len(distinct) == 1:
            unique[path] = distinct[0]
        else:
            ambiguous[path] = distinct
    return unique, ambiguous


def _paths_by_node(by_name: dict[str, fx.Node]) -> dict[fx.Node, list[str]]:
    """Map each node to the module paths whose output it is, shortest first."""
    paths: dict[fx.Node, list[str]] = defaultdict(list)
    for path in sorted(by_name, key=_path_rank):
        paths[by_name[path]].append(path)
    return paths


def _path_rank(path: str) -> tuple[int, int, str]:
    """Order module paths by depth, then length, then alphabetically."""
    return (path.count("."), len(path), path)


def _ancestors(roots: Iterable[fx.Node], stop: fx.Node | None = None) -> set[fx.Node]:
    """Return ``roots`` and every node they depend on, not looking past ``stop``."""
    seen: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node is not stop:
            stack.extend(node.all_input_nodes)
    return seen


def _quoted(names: Iterable[str], limit: int | None = None) -> str:
    """Join names as a quoted, comma-separated list, eliding after ``limit`` of them."""
    items = list(names)
    shown = items if limit is None else items[:limit]
    text = ", ".join(repr(name) for name in shown)
    return text + (f", ... ({len(items) - len(shown)} more)" if len(shown) < len(items) else "")


def _quoted_or_none(cut: CutPoint | None) -> str:
    """Quote a cut point's name, or say there is none."""
    return "none" if cut is None else repr(cut.name)
