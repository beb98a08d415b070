"""Per-cut profile of a model: tensor crossing the cut, FLOPs, parameters and head latency.

FLOPs are counted the way ``torch.utils.flop_counter.FlopCounterMode`` counts them:
matrix products, convolutions and attention; element-wise operations count zero. Each graph
node is counted once, in a single forward pass, and the per-cut head and tail figures are
prefix sums over execution order.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from tandem.device import synchronize
from tandem.split import CutPoint, TracedModel, trace_model

__all__ = ["CutProfile", "ProgressCallback", "evaluating", "model_flops", "profile_cuts"]

_aten = torch.ops.aten


@dataclass(frozen=True)
class CutProfile:
    """What cutting the model at one place costs.

    ``shape`` and ``raw_bytes`` describe the tensor crossing the cut for one sample (no batch
    dimension). FLOPs and parameter counts are per sample and split between head and tail.
    ``head_latency_ms`` is the median wall time of the head on this machine for a whole batch,
    or ``None`` when timing was skipped.
    """

    name: str
    node: str
    index: int
    shape: tuple[int, ...]
    dtype: str
    raw_bytes: int
    head_flops: int
    tail_flops: int
    head_params: int
    tail_params: int
    head_latency_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of the profile."""
        return {**asdict(self), "shape": list(self.shape)}


ProgressCallback = Callable[[], object]


def model_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Return the FLOPs of one forward pass of ``model`` for one sample of ``input_shape``.

    The model runs in eval mode (its modes are restored afterwards) on the device of its
    parameters; a meta-device model is counted without computing anything.
    """
    with evaluating(model), torch.no_grad(), _flop_counter() as counter:
        model(_example_input(model, input_shape, batch_size=1))
    return int(counter.get_total_flops())


def profile_cuts(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch_size: int = 1,
    repeats: int = 5,
    cuts: list[str] | None = None,
    progress: ProgressCallback | None = None,
) -> list[CutProfile]:
    """Profile ``model`` at each cut point, or at the named ``cuts``, in execution order.

    ``input_shape`` excludes the batch dimension. The head of each cut is timed ``repeats``
    times on a batch of ``batch_size`` after one warm-up run; ``repeats=0`` skips timing, which
    is the only option for a model on the meta device. ``progress`` is called with no
    arguments once per profiled cut, so a caller can advance a progress bar.
    """
    if batch_size < 1 or repeats < 0:
        raise ValueError(f"need batch_size >= 1 and repeats >= 0, got {batch_size}, {repeats}")
    if repeats and any(p.is_meta for p in model.parameters()):
        raise ValueError("timing needs real weights; pass repeats=0 for a meta-device model")
    traced = trace_model(model)
    points = _selected_cuts(traced, cuts)
    profiles: list[CutProfile] = []
    with evaluating(model):
        counts = _NodeCounter(traced.graph_module)
        counts.run_once(_example_input(model, input_shape, batch_size=1))
        head_flops = _prefix_sums(traced.nodes, counts.flops)
        batch = _example_input(model, input_shape, batch_size)
        for point in points:
            profile = _profile_cut(traced, point, counts, head_flops, batch, repeats)
            profiles.append(profile)
            if progress is not None:
                progress()
    return profiles


def _selected_cuts(traced: TracedModel, cuts: list[str] | None) -> list[CutPoint]:
    """Resolve the requested cut names, in execution order, or take every cut point."""
    if cuts is None:
        return list(traced.cut_points)
    return sorted({traced.resolve(name) for name in cuts}, key=lambda point: point.index)


def _profile_cut(
    traced: TracedModel,
    point: CutPoint,
    counts: _NodeCounter,
    head_flops: dict[str, int],
    batch: torch.Tensor,
    repeats: int,
) -> CutProfile:
    """Split at ``point`` and measure it."""
    split = traced.split(point)
    shape, dtype = counts.tensor_meta(point.node)
    element_size = torch.empty((), dtype=dtype).element_size()
    total_flops = sum(counts.flops.values())
    return CutProfile(
        name=point.name,
        node=point.node,
        index=point.index,
        shape=shape,
        dtype=str(dtype).removeprefix("torch."),
        raw_bytes=_numel(shape) * element_size,
        head_flops=head_flops[point.node],
        tail_flops=total_flops - head_flops[point.node],
        head_params=_count_parameters(split.head),
        tail_params=_count_parameters(split.tail),
        head_latency_ms=_median_latency_ms(split.head, batch, repeats) if repeats else None,
    )


class _NodeCounter(fx.Interpreter):
    """Runs a traced graph once, counting FLOPs and recording tensor metadata per node."""

    def __init__(self, module: fx.GraphModule) -> None:
        """Prepare to run ``module``'s graph."""
        super().__init__(module)
        self.flops: dict[str, int] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def run_once(self, sample: torch.Tensor) -> None:
        """Run the graph on a batch of one without autograd."""
        with torch.no_grad():
            self.run(sample)

    def run_node(self, n: fx.Node) -> Any:
        """Run one node inside its own FLOP counter."""
        with _flop_counter() as counter:
            result = super().run_node(n)
        self.flops[n.name] = int(counter.get_total_flops())
        if isinstance(result, torch.Tensor):
            self._meta[n.name] = (tuple(result.shape[1:]), result.dtype)
        return result

    def tensor_meta(self, node: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Return the per-sample shape and dtype of a node's tensor value."""
        if node not in self._meta:
            raise ValueError(f"the value of node {node!r} is not a tensor; it cannot be profiled")
        return self._meta[node]


def _prefix_sums(nodes: Sequence[fx.Node], flops: dict[str, int]) -> dict[str, int]:
    """Map each node to the FLOPs of it and every node executed before it."""
    running = 0
    sums: dict[str, int] = {}
    for node in nodes:
        running += flops.get(node.name, 0)
        sums[node.name] = running
    return sums


def model_latency_ms(model: nn.Module, input_shape: Sequence[int], repeats: int = 5) -> float:
    """Median wall time of ``model`` on one seeded input of ``input_shape``, in milliseconds,
    on the model's device, after one warm-up run."""
    with evaluating(model):
        return _median_latency_ms(model, _example_input(model, input_shape, 1), max(repeats, 1))


def _median_latency_ms(module: nn.Module, batch: torch.Tensor, repeats: int) -> float:
    """Time ``module`` on ``batch`` after one warm-up run; return the median in milliseconds."""
    times: list[float] = []
    with torch.inference_mode():
        module(batch)
        for _ in range(repeats):
            start = time.perf_counter()
            module(batch)
            synchronize(batch.device)  # a GPU returns before its work is done
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _count_parameters(module: nn.Module) -> int:
    """Return the number of parameter elements, counting shared parameters once."""
    return sum(p.numel() for p in module.parameters())


def _numel(shape: Sequence[int]) -> int:
    """Return the number of elements of a tensor of ``shape``."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def _example_input(model: nn.Module, input_shape: Sequence[int], batch_size: int) -> torch.Tensor:
    """Return a seeded random batch on the model's device."""
    if not input_shape or any(dim < 1 for dim in input_shape):
        raise ValueError(f"input_shape must be non-empty and positive, got {tuple(input_shape)}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn((batch_size, *input_shape), generator=generator)
    return sample.to(device)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, restoring each one's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _flop_counter() -> FlopCounterMode:
    """Return a silent FLOP counter that also knows the CPU attention kernels."""
    return FlopCounterMode(display=False, custom_mapping=_ATTENTION_FORMULAS)


def _sdpa_cpu_flops(
    query: Sequence[int], key: Sequence[int], value: Sequence[int], *args: Any, **kwargs: Any
) -> int:
    """FLOPs of the CPU flash-attention kernel, which torch's counter has no formula for."""
    return int(sdpa_flop_count(query, key, value))


def _native_mha_flops(
    query: Sequence[int], key: Sequence[int], value: Sequence[int], *args: Any, **kwargs: Any
) -> int:
    """FLOPs of ``nn.MultiheadAttention``'s fused inference path, as its unfused ops count.

    Input, key and value projections, the two attention products, and the output projection
    are all dense products of width ``embed``; each multiply-add is two FLOPs.
    """
    batch, q_len, embed = query
    kv_len = key[1]
    projections = 2 * batch * embed * embed * (2 * q_len + 2 * kv_len)
    attention = 2 * 2 * batch * q_len * kv_len * embed
    return projections + attention


_ATTENTION_FORMULAS: dict[Any, Callable[..., int]] = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    _aten._native_multi_head_attention: _native_mha_flops,
}
