"""Rank algebra on LoRA adapters held as arrays: truncate, pad, stack, re-factor.

An adapter here is the flat ``{"<module>.lora_A": A, "<module>.lora_B": B}`` mapping of
``federated.lora``. Its delta per module is ``B @ A`` (times the adapter's scale); every
operation below says what it does to that delta.
"""

from __future__ import annotations

import numpy as np
import torch

from tandem.federated.lora import Arrays, pairs

SVD_TOLERANCE = 1e-6  # singular values below this fraction of the largest are dropped


def truncate_tensor(key: str, x: np.ndarray, rank: int) -> np.ndarray:
    """The first ``rank`` components of one LoRA tensor (A's rows, B's columns)."""
    return x[:, :rank] if key.endswith(".lora_B") else x[:rank]


def truncate_rank(arrays: Arrays, rank: int) -> Arrays:
    """The first ``rank`` components of every pair (A's rows, B's columns)."""
    pairs(arrays)  # both halves of every pair, or a LoraError
    return {k: truncate_tensor(k, v, rank) for k, v in arrays.items()}


def pad_rank(arrays: Arrays, rank: int) -> Arrays:
    """Every pair zero-padded to ``rank`` components."""
    out: Arrays = {}
    for module, (a, b) in pairs(arrays).items():
        extra = rank - a.shape[0]
        if extra < 0:
            raise ValueError(f"{module}: rank {a.shape[0]} exceeds {rank}")
        out[f"{module}.lora_A"] = np.concatenate([a, np.zeros((extra, *a.shape[1:]), a.dtype)])
        out[f"{module}.lora_B"] = np.concatenate(
            [b, np.zeros((b.shape[0], extra, *b.shape[2:]), b.dtype)], axis=1
        )
    return out


def scale_b(arrays: Arrays, factor: float) -> Arrays:
    """Every B multiplied by ``factor``: the pair's delta scaled, A untouched."""
    return {k: (v * np.float32(factor) if k.endswith(".lora_B") else v) for k, v in arrays.items()}


def concat_ranks(parts: list[Arrays]) -> Arrays:
    """Stack adapters: A rows and B columns side by side, so the deltas add up."""
    stacked = [pairs(p) for p in parts]
    out: Arrays = {}
    for module in sorted(set().union(*stacked)):
        present = [s[module] for s in stacked if module in s]
        out[f"{module}.lora_A"] = np.concatenate([a for a, _ in present])
        out[f"{module}.lora_B"] = np.concatenate([b for _, b in present], axis=1)
    return out


def compact(arrays: Arrays) -> Arrays:
    """The same deltas (scale 1) with each pair re-factored by SVD to its numerical rank,
    then zero-padded so that every pair has one rank (as a PEFT adapter must)."""
    out: Arrays = {}
    for module, (a, b) in pairs(arrays).items():
        delta = (
            torch.from_numpy(b.reshape(b.shape[0], -1)).double()
            @ torch.from_numpy(a.reshape(a.shape[0], -1)).double()
        )
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        keep = max(1, int((s > s[0] * SVD_TOLERANCE).sum())) if s.numel() and s[0] > 0 else 1
        root = s[:keep].sqrt()
        new_b = (u[:, :keep] * root).float().numpy().reshape(b.shape[0], keep, *b.shape[2:])
        new_a = (root[:, None] * vh[:keep]).float().numpy().reshape(keep, *a.shape[1:])
        out[f"{module}.lora_A"], out[f"{module}.lora_B"] = new_a, new_b
    return pad_rank(out, max(a.shape[0] for k, a in out.items() if k.endswith(".lora_A")))
