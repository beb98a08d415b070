"""LoRA on a bundle, attached with PEFT: on its cloud side (decoder + tail) and optionally on
its device side (the head's encoder).

Head modules are named ``head.<path in the encoder>`` (``head.body.0.0``), cloud-side ones by
their path in the decoder + tail (``decoder.out``, ``tail.fc``), so one set of arrays can hold
both, and :func:`split_head` parts them where they are published.

Adapter weights travel and aggregate as plain arrays keyed ``<module>.lora_A`` and
``<module>.lora_B``, shaped as PEFT shapes them: for ``nn.Linear(in, out)`` A is (r, in) and
B (out, r); for ``nn.Conv2d(in, out, k)`` A is (r, in, kh, kw) and B (out, r, 1, 1). The base
weights never leave the model and never get a gradient.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from tandem.adapters import EXPORTED_HINT, lora_delta, save_adapter

Arrays = dict[str, np.ndarray]
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])$")
_PEFT_PARAM = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.default\.weight$"
)


HEAD = "head."  # the prefix of head (device-side) modules

# Convs that are never called as modules, so a LoRA wrapper on them would never run: both
# slice their weight to the channels that cross the wire at the chosen width.
_NOT_CALLED = {
    "decoder.expand": "the decoder slices its weight per width and never calls it",
    HEAD + "project": "the encoder slices its weight per width and never calls it",
}


class LoraError(ValueError):
    """Targets that do not name adaptable modules, or arrays that do not fit the model."""


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


def resolve_targets(model: nn.Module, spec: str) -> list[str]:
    """Full module paths of the decoder + tail LoRA targets named by ``spec`` (``model`` may
    hold a head too: its modules are never chosen here, see :func:`resolve_head_targets`).

    ``auto`` is the classifier (every Linear) plus every conv of the tail's last stage: the
    layers nearest the output, where a domain shift is cheapest to correct. An exported tail
    (a model outside the zoo) has no layers to adapt, so there ``auto`` is the decoder's
    convs, which the forward pass calls. ``none`` is no
    target (for a federation that adapts only the head). Otherwise ``spec`` is a
    comma-separated list of module paths or path suffixes (``fc`` matches ``tail.fc``,
    ``decoder.out`` the decoder's last conv), each of which must name at least one Linear or
    Conv2d that the forward pass calls.
    """
    if spec.strip() == "none":
        return []
    modules = {n: m for n, m in _adaptable(model).items() if not n.startswith(HEAD)}
    exported = not any(n.startswith("tail.") for n in modules)
    if spec.strip() == "auto":
        stages = sorted({n.split(".")[1] for n in modules if n.startswith("tail.layer")})
        last = f"tail.{stages[-1]}." if stages else "\0"
        chosen = [n for n, m in modules.items() if isinstance(m, nn.Linear) or n.startswith(last)]
        if exported:
            # An exported tail (a user's model) has no layers left to adapt: its decoder does.
            chosen = [n for n in modules if n.startswith("decoder.") and n not in _NOT_CALLED]
        return sorted(chosen)
    return _named(modules, spec, "the tail" + (EXPORTED_HINT if exported else ""))


def resolve_head_targets(encoder: nn.Module, spec: str) -> list[str]:
    """``head.``-prefixed paths of the head (encoder) LoRA targets named by ``spec``.

    ``""`` is none; ``auto`` is every conv of the encoder's body, which sees the raw input
    first and so can undo a device's own shift (its camera, its lighting); otherwise a
    comma-separated list of encoder paths or suffixes (``body.0.0``). The projection to the
    bottleneck is refused: the encoder slices it to the width sent.
    """
    modules = {HEAD + n: m for n, m in _adaptable(encoder).items()}
    if not spec.strip():
        return []
    if spec.strip() == "auto":
        return sorted(n for n in modules if n.startswith(HEAD + "body."))
    return _named(modules, spec, "the head")


def _named(modules: Mapping[str, nn.Module], spec: str, where: str) -> list[str]:
    named: set[str] = set()
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        hits = [n for n in modules if n == name or n.endswith("." + name)]
        if not hits:
            raise LoraError(f"target {name!r} names no Linear or Conv2d of {where}")
        for hit in hits:
            if hit in _NOT_CALLED:
                raise LoraError(f"target {hit!r} cannot take LoRA: {_NOT_CALLED[hit]}")
        named.update(hits)
    if not named:
        raise LoraError(f"no LoRA targets given for {where}")
    return sorted(named)


def split_head(arrays: Mapping[str, np.ndarray]) -> tuple[Arrays, Arrays]:
    """(head arrays keyed by encoder path, decoder + tail arrays) of ``arrays``."""
    head = {k.removeprefix(HEAD): v for k, v in arrays.items() if k.startswith(HEAD)}
    return head, {k: v for k, v in arrays.items() if not k.startswith(HEAD)}


def has_head(keys: Iterable[str]) -> bool:
    """Whether any of these array keys adapts the head."""
    return any(k.startswith(HEAD) for k in keys)


def attach(
    model: nn.Module, targets: list[str], rank: int, alpha: float, seed: int = 0
) -> PeftModel:
    """``model`` with fresh LoRA adapters on ``targets`` (PEFT's init: A random, B zero).

    Base parameters are frozen; the adapter's initial A depends only on ``seed``.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    # PEFT annotates lora_alpha as int but computes alpha / r in floats; a client of a
    # lower rank needs a fractional alpha to keep the global scale (federated.strategies).
    config = LoraConfig(r=rank, target_modules=targets, lora_dropout=0.0)
    config.lora_alpha = alpha  # type: ignore[assignment]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def lora_arrays(model: PeftModel) -> Arrays:
    """The adapter's A and B weights as float32 arrays, keyed ``<module>.lora_{A,B}``."""
    out: Arrays = {}
    for name, param in model.named_parameters():
        m = _PEFT_PARAM.match(name)
        if m:
            out[f"{m['module']}.lora_{m['part']}"] = param.detach().cpu().numpy().copy()
    return out


def load_arrays(model: PeftModel, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy ``arrays`` into the adapter; LoraError for a key or shape it does not have."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in arrays.items():
            m = _KEY.match(key)
            name = m and f"base_model.model.{m['module']}.lora_{m['part']}.default.weight"
            if not name or name not in params:
                raise LoraError(f"the model has no LoRA weight {key!r}")
            if tuple(params[name].shape) != tuple(value.shape):
                raise LoraError(
                    f"{key}: shape {tuple(value.shape)} does not fit {tuple(params[name].shape)}"
                )
            params[name].copy_(torch.from_numpy(np.asarray(value, np.float32)))


def pairs(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{module: (A, B)}`` from flat arrays; LoraError when a half is missing."""
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        m = _KEY.match(key)
        if not m:
            raise LoraError(f"{key!r} is not a LoRA weight")
        halves.setdefault(m["module"], {})[m["part"]] = value
    for module, h in halves.items():
        if set(h) != {"A", "B"}:
            raise LoraError(f"{module}: lora_A and lora_B must come together")
    return {module: (h["A"], h["B"]) for module, h in sorted(halves.items())}


def rank_of(arrays: Mapping[str, np.ndarray]) -> int:
    """The rank shared by every pair in ``arrays``; LoraError when they differ."""
    ranks = {a.shape[0] for a, _ in pairs(arrays).values()}
    if len(ranks) != 1:
        raise LoraError(f"pairs of different ranks {sorted(ranks)}")
    return ranks.pop()


def merge_into(model: nn.Module, arrays: Mapping[str, np.ndarray], scale: float) -> None:
    """Add ``scale * B @ A`` of every pair to its module's weight, in place.

    The delta is the cloud's own (``tandem.adapters.lora_delta``), added in float32 as the
    cloud adds it, so a model merged here computes what the service computes.
    """
    modules = _adaptable(model)
    with torch.no_grad():
        for module, (a, b) in pairs(arrays).items():
            if module not in modules:
                raise LoraError(f"the model has no Linear or Conv2d {module!r}")
            weight = modules[module].weight
            assert isinstance(weight, torch.Tensor)
            delta = lora_delta(module, torch.from_numpy(a), torch.from_numpy(b), a.shape[0], scale)
            weight.copy_(weight.float() + delta.reshape(weight.shape))


def publish(
    path: Path,
    arrays: Mapping[str, np.ndarray],
    alpha: float,
    tenant: str = "",
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write ``arrays`` as a PEFT-format adapter directory ``path`` (which must not exist),
    with ``metadata`` in its ``tandem.json``."""
    lora = {m: (torch.from_numpy(a), torch.from_numpy(b)) for m, (a, b) in pairs(arrays).items()}
    save_adapter(
        path,
        lora=lora,
        rank=rank_of(arrays),
        alpha=alpha,
        target_modules=sorted(lora),
        tenant=tenant,
        metadata=metadata,
    )
