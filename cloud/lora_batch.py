"""Many adapters, one forward pass: batched LoRA for rows that name different adapters.

S-LoRA's idea for the cloud tail. The base decoder + tail runs once for the whole batch and,
at every adapted module, each row adds its own low-rank term ``scale_i * B_i(A_i(x_i))``,
with no merged copy per adapter. Per module, the rows' factors are gathered from the
adapters' stacked factors (``cloud/lora_pool.py``), cut to the batch's largest rank there
(shorter ranks are zero-padded; a row whose adapter does not target the module, or that
names none, gathers zeros), and the terms of all rows are computed together:

* ``nn.Linear``: two batched matrix products, x_i A_i^T, then times B_i;
* ``nn.Conv2d``: one grouped convolution with the rows folded into the channel axis (input
  (1, N*in, H, W), kernel (N*r, in, kh, kw), groups N, the module's stride, padding and
  dilation), then a batched product with B; or, where the output is a single position,
  batched products over the one input window it reads.

The terms are added by forward hooks on a private copy of decoder + tail, never on the
shared model. A batch's adapters reach the hooks through a thread-local plan, so worker
threads share the copy without seeing each other's rows; the plan lives for one call.

An adapter is served this way only when every module it targets is called as a module, on
inputs whose first axis is the batch (found once by probing the copy at each trained width).
The decoder's first conv is not: the decoder slices its weight and applies it itself, so
hooks never see it; adapters that target it keep being served by their merged copies.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tandem.adapters import Adapter
from tandem.cloud.lora_pool import AdapterKey, Pool, key_of

_local = threading.local()
_PROBE_ROWS = (2, 3)  # two batch sizes: a layer whose input's first axis is the batch at both


class MixedLoRA:
    """A copy of decoder + tail that adds each row's own LoRA term at every adapted layer."""

    def __init__(self, model: nn.Module, input_shapes: Iterable[tuple[int, ...]]) -> None:
        """Hook ``model`` (a private copy: it must not be shared with plain callers), then
        probe it on zero inputs of each (C, H, W) in ``input_shapes``."""
        self.model = model.eval()
        self.device = next(model.parameters()).device
        for name, module in model.named_modules():
            if _hookable(module):
                module.register_forward_hook(functools.partial(_add_terms, name))
        self.adaptable = _probe(self.model, input_shapes, self.device)
        self._pool = Pool(device=self.device)
        self._lock = threading.Lock()
        self._serves: dict[AdapterKey, bool] = {}

    def serves(self, adapter: Adapter) -> bool:
        """Whether this copy computes ``adapter``'s terms at every module it targets."""
        key = key_of(adapter)
        if key not in self._serves:  # asked for every row of every mixed batch
            factors = set(adapter.factors)
            self._serves[key] = set(adapter.targets) <= factors <= self.adaptable
        return self._serves[key]

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor, adapters: Sequence[Adapter | None]) -> torch.Tensor:
        """Logits of ``batch``, row i with ``adapters[i]`` (None: the base model)."""
        return _run(self.model, batch, _Plan(self._pool_with(adapters), adapters))

    def _pool_with(self, adapters: Sequence[Adapter | None]) -> Pool:
        """A pool holding every adapter of the batch: the current one, or one that adds them."""
        pool = self._pool
        if not pool.lacks(adapters):
            return pool
        with self._lock:  # another thread may have added them meanwhile
            self._pool = self._pool.serving(adapters)
            return self._pool


def _hookable(module: nn.Module) -> bool:
    # A grouped conv's LoRA pair has another shape, and a padding mode other than zeros
    # pads before the convolution: neither fits the grouped convolution below.
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear)


def _run(model: nn.Module, batch: torch.Tensor, plan: _Plan | _Probe) -> torch.Tensor:
    _local.plan = plan
    try:
        out: torch.Tensor = model(batch)
        return out
    finally:
        _local.plan = None


def _add_terms(name: str, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """Forward hook: the module's output plus its rows' LoRA terms, under the current plan."""
    plan = getattr(_local, "plan", None)
    return None if plan is None else plan.apply(name, module, args[0], output)


@torch.inference_mode()
def _probe(
    model: nn.Module, input_shapes: Iterable[tuple[int, ...]], device: torch.device
) -> frozenset[str]:
    """The hooked modules called on row-aligned inputs (zeros on the model's ``device``) at
    every probed batch size."""
    probes = [_Probe(rows) for rows in _PROBE_ROWS]
    for shape in input_shapes:
        for probe in probes:
            _run(model, torch.zeros(probe.rows, *shape, device=device), probe)
    aligned = frozenset.intersection(*(frozenset(p.aligned) for p in probes))
    return aligned - frozenset().union(*(p.misaligned for p in probes))


class _Probe:
    """A plan that adds nothing and records, per module, whether its input is row-aligned."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.aligned: set[str] = set()
        self.misaligned: set[str] = set()

    def apply(self, name: str, module: nn.Module, x: Any, output: Any) -> None:
        """Record ``name``; leave the output as it is."""
        aligned = isinstance(x, torch.Tensor) and x.ndim >= 2 and x.shape[0] == self.rows
        (self.aligned if aligned else self.misaligned).add(name)


class _Plan:
    """One batch: each row's slot in a pool, from which each module gathers its factors."""

    def __init__(self, pool: Pool, adapters: Sequence[Adapter | None]) -> None:
        self.pool = pool
        slots = [0 if a is None else pool.slots[key_of(a)] for a in adapters]
        self.slots = torch.tensor(slots, dtype=torch.long, device=pool.device)
        self.used = set(slots) - {0}

    def apply(self, name: str, module: nn.Module, x: torch.Tensor, output: Any) -> Any:
        """``output`` plus the rows' terms at module ``name`` (unchanged if none targets it)."""
        factors = self._gather(name)
        if factors is None:
            return output
        a, b = (f.to(x.dtype) for f in factors)
        if isinstance(module, nn.Conv2d):
            return _add_conv_terms(module, x, a, b, output)
        return _add_linear_terms(x, a, b, output)

    def _gather(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per row, module ``name``'s (A, B) cut to the batch's largest rank R there:
        (N, R, *A's shape without r) and (N, R, out); None when no row's adapter targets it."""
        bank = self.pool.banks.get(name)
        if bank is None:
            return None
        rank = max((bank.ranks[s] for s in self.used), default=0)
        if rank == 0:
            return None
        a_out, b_out = _buffers(self.pool.device)
        a = _select(bank.a[:, :rank], self.slots, a_out)
        return a, _select(bank.b[:, :rank], self.slots, b_out)


def _buffers(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's two tensors on ``device`` to gather a module's factors into.

    Gathered factors run to megabytes per module and batch; fresh tensors each time would
    go back to the OS when freed and fault their pages in again on every batch, which on a
    small tail costs more than the arithmetic. Reusing them is safe: a thread runs one
    forward pass at a time, and each module's terms are computed before the next gathers.
    """
    kept: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] | None = getattr(
        _local, "buffers", None
    )
    if kept is None:
        kept = _local.buffers = {}
    if device not in kept:
        kept[device] = (torch.empty(0, device=device), torch.empty(0, device=device))
    return kept[device]


def _select(source: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``source[rows]`` written into ``out``, which grows when it must and never shrinks."""
    out.resize_(len(rows), *source.shape[1:])
    return torch.index_select(source, 0, rows, out=out)


def _add_linear_terms(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, output: torch.Tensor
) -> torch.Tensor:
    """``output`` plus the rows' (x_i A_i^T) B_i for a Linear: x (N, ..., in), a (N, R, in),
    b (N, R, out)."""
    n, out = len(a), b.shape[-1]
    rows = x.reshape(n, -1, x.shape[-1])  # (N, T, in): any middle axes become T
    low = torch.bmm(rows, a.transpose(1, 2))  # (N, T, R)
    return torch.baddbmm(output.reshape(n, -1, out), low, b).reshape(output.shape)


def _add_conv_terms(
    module: nn.Conv2d, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, output: torch.Tensor
) -> torch.Tensor:
    """``output`` plus the rows' B_i(A_i(x_i)) for a Conv2d: x (N, in, H, W),
    a (N, R, in, kh, kw), b (N, R, out).

    A grouped convolution gives each row its own kernel in one call: the rows become groups
    of the channel axis. A convolution with a single output position (a late stage of a
    small-input model) is instead a matrix-vector product per row, over the one window of
    input it reads: a batched product does that several times faster.
    """
    n, rank = a.shape[:2]
    padding: Any = module.padding  # a tuple of ints, or "same"/"valid"
    if output.shape[2:] == (1, 1) and isinstance(padding, tuple):
        window = _window(x, module.kernel_size, padding, module.dilation)
        low = torch.bmm(window, a.reshape(n, rank, -1).transpose(1, 2)).transpose(1, 2)
    else:
        folded = x.reshape(1, n * x.shape[1], *x.shape[2:])
        kernels = a.reshape(n * rank, *a.shape[2:])
        conv = F.conv2d(folded, kernels, None, module.stride, padding, module.dilation, groups=n)
        low = conv.reshape(n, rank, -1)  # (N, R, H'W')
    flat = output.reshape(n, output.shape[1], -1)  # (N, out, H'W')
    # baddbmm adds in the same call; with B as (N, out, R) it is also the quicker layout.
    return torch.baddbmm(flat, b.transpose(1, 2), low).reshape(output.shape)


def _window(
    x: torch.Tensor,
    kernel: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> torch.Tensor:
    """Per row, the input values that a convolution's one output position reads:
    (N, 1, in*kh*kw), ordered as its kernel's weights flatten."""
    (kh, kw), (ph, pw), (dh, dw) = kernel, padding, dilation
    padded = F.pad(x, (pw, pw, ph, ph))
    window = padded[:, :, : dh * (kh - 1) + 1 : dh, : dw * (kw - 1) + 1 : dw]
    return window.reshape(len(x), 1, -1)
