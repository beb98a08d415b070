"""The adapters' LoRA factors, stacked per module, for batched LoRA (``cloud/lora_batch.py``).

Gathering a batch's factors from each adapter on every pass would cost a concatenation of up
to a batch's worth of small tensors per module, which on a small tail costs more than the
LoRA arithmetic itself. Like S-LoRA's unified memory pool, every adapter a model has served
instead gets a slot, and each module one stacked tensor per factor: slot s holds adapter s's
pair, zero-padded to the module's largest rank; slot 0 is all zeros, for rows that name no
adapter and adapters that do not target the module. A batch then gathers each module's
factors with one index per factor.

Banks live on the model's device (``Pool.device``), so a batch on a GPU gathers its factors
there. A pool is immutable: a batch naming adapters it lacks gets a new pool with them added, and
batches already running keep the one they started with. Slots are never reused for other
weights, since adapter versions are immutable; past :data:`MAX_SLOTS` adapters, the new pool
holds only the batch's own adapters (all of them, not just the ones it lacked), so adapters
long gone do not pin memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from tandem.adapters import Adapter
from tandem.device import CPU

MAX_SLOTS = 1024
AdapterKey = tuple[str, str]


def key_of(adapter: Adapter) -> AdapterKey:
    """An adapter's identity within one model: (name, version)."""
    return adapter.name, adapter.version


@dataclass(frozen=True)
class Bank:
    """One module's factors for every slot: ``a`` (S, R, *lora_A's shape without r) and
    ``b`` (S, R, out), with B scaled; ``ranks[s]`` is slot s's true rank (0: no pair)."""

    a: torch.Tensor
    b: torch.Tensor
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Pool:
    """Slots of adapters (slot 0: none) and, per adapted module, its :class:`Bank`."""

    adapters: tuple[Adapter, ...] = ()
    slots: dict[AdapterKey, int] = field(default_factory=dict)
    banks: dict[str, Bank] = field(default_factory=dict)
    device: torch.device = CPU

    def lacks(self, adapters: Iterable[Adapter | None]) -> list[Adapter]:
        """The adapters among ``adapters`` that have no slot here, each once."""
        missing: dict[AdapterKey, Adapter] = {}
        for a in adapters:
            if a is not None and key_of(a) not in self.slots:
                missing.setdefault(key_of(a), a)
        return list(missing.values())

    def serving(self, batch: Sequence[Adapter | None]) -> Pool:
        """A pool with a slot for every adapter of ``batch``: this one when it has them, else
        one that adds the missing ones (or, past :data:`MAX_SLOTS`, holds only the batch's)."""
        new = self.lacks(batch)
        if not new:
            return self
        full = len(self.adapters) + len(new) > MAX_SLOTS
        adapters = (*Pool().lacks(batch),) if full else (*self.adapters, *new)
        slots = {key_of(a): slot for slot, a in enumerate(adapters, start=1)}
        modules = sorted({m for a in adapters for m in a.factors})
        banks = {m: _bank(m, adapters, self.device) for m in modules}
        return Pool(adapters, slots, banks, self.device)


def _bank(module: str, adapters: tuple[Adapter, ...], device: torch.device) -> Bank:
    """Module ``module``'s stacked factors; slot s + 1 is ``adapters[s]``."""
    pairs = [a.factors.get(module) for a in adapters]
    present = [f for f in pairs if f is not None]
    rank = max(f.rank for f in present)
    first = present[0]
    a = first.a.new_zeros(len(adapters) + 1, rank, *first.a.shape[1:])
    b = first.b.new_zeros(len(adapters) + 1, rank, first.b.shape[1])
    for slot, factors in enumerate(pairs, start=1):
        if factors is not None:
            a[slot, : factors.rank] = factors.a
            b[slot, : factors.rank] = factors.b
    ranks = (0, *(0 if f is None else f.rank for f in pairs))
    return Bank(a.to(device), b.to(device), ranks)
