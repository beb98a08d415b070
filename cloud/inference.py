"""Decoder + tail over one batch: what a worker thread runs.

Each payload is decoded on its own, so one corrupt request fails alone while the rest of
its batch is answered. Shapes were checked against the bundle when the requests arrived.

Each row names its own adapter, or none. A batch whose rows all name the same one runs on
the plain model or that adapter's merged copy; a mixed batch runs once, on the batched-LoRA
copy (``cloud/lora_batch.py``), except for rows whose adapter that copy cannot serve, which
run on their adapter's merged copy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tandem import codec, entropy_codec
from tandem.adapters import Adapter
from tandem.cloud.lora_pool import AdapterKey, key_of
from tandem.cloud.repository import ModelEntry


class BadFeatures(ValueError):
    """Features that fail to decode, or that drive the tail out of the float range."""


@dataclass(frozen=True)
class Target:
    """A validated request on its way to a batch: what to run, on what, and until when."""

    entry: ModelEntry
    adapter: Adapter | None
    width: float
    payload: bytes
    deadline: float | None


Outcome = tuple["Scores | BadFeatures", float, float]
"""One request's result, with its batch's decode and compute seconds."""


@dataclass(frozen=True)
class Scores:
    """One request's logits, softmax probabilities, and class indices best first."""

    logits: np.ndarray
    probs: np.ndarray
    order: np.ndarray


@dataclass
class BatchOutput:
    """A batch's logits (rows of the requests that decoded), why the others failed, and the
    batch's stage times. Compact on purpose: it crosses a pipe from a worker process as a
    few buffers, not one pickled object per request."""

    logits: np.ndarray
    errors: dict[int, str]
    decode_s: float
    compute_s: float

    def outcomes(self) -> list[Outcome]:
        """One outcome per request of the batch, in order."""
        rows = iter(_scores(self.logits))
        return [
            (BadFeatures(self.errors[i]) if i in self.errors else next(rows), *self.times)
            for i in range(len(self.logits) + len(self.errors))
        ]

    @property
    def times(self) -> tuple[float, float]:
        """The batch's decode and compute seconds."""
        return self.decode_s, self.compute_s


def run_batch(
    entry: ModelEntry,
    adapters: Sequence[Adapter | None],
    payloads: Sequence[bytes],
    width: float,
) -> BatchOutput:
    """Decode ``payloads`` (all sent at ``width``) and run decoder + tail, row i with
    ``adapters[i]``. A payload is v1 (self-describing) or v2 (entropy-coded, shaped by
    ``width``), each on its own."""
    start = time.perf_counter()
    errors: dict[int, str] = {}
    arrays: list[np.ndarray] = []
    decoded: list[Adapter | None] = []
    for i, (payload, adapter) in enumerate(zip(payloads, adapters, strict=True)):
        try:
            arrays.append(_decode(entry, payload, width))
            decoded.append(adapter)
        except codec.CodecError as exc:
            errors[i] = str(exc)
    mid = time.perf_counter()
    logits = np.zeros((0, 0), np.float32)
    if arrays:
        batch = torch.from_numpy(np.stack(arrays).astype(np.float32))
        logits = _forward(entry, decoded, entry.runner.to_device(batch))
    return BatchOutput(logits, errors, mid - start, time.perf_counter() - mid)


def _decode(entry: ModelEntry, payload: bytes, width: float) -> np.ndarray:
    if entropy_codec.is_v2(payload):
        return entry.runner.decode_entropy(payload, width)
    return codec.decode(payload, max_elements=entry.runner.max_elements)


def _scores(logits: np.ndarray) -> list[Scores | BadFeatures]:
    # Finite features can still overflow the tail (the codec allows values near the float32
    # limit): such a request gets an error, not NaN scores.
    if not len(logits):
        return []
    finite = np.isfinite(logits).all(axis=1)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    order = np.argsort(-logits, axis=1, kind="stable")
    return [
        Scores(logits[r], probs[r], order[r])
        if finite[r]
        else BadFeatures("the tail's output is not finite")
        for r in range(len(logits))
    ]


def _key(adapter: Adapter | None) -> AdapterKey | None:
    return None if adapter is None else key_of(adapter)


@torch.inference_mode()
def _forward(
    entry: ModelEntry, adapters: Sequence[Adapter | None], batch: torch.Tensor
) -> np.ndarray:
    if len({_key(a) for a in adapters}) == 1:
        return _merged(entry, adapters[0], batch)
    mixed = entry.mixed()
    shared: list[int] = []  # rows the batched-LoRA copy serves
    alone: dict[AdapterKey | None, list[int]] = {}  # the others, by adapter
    for row, adapter in enumerate(adapters):
        if adapter is None or mixed.serves(adapter):
            shared.append(row)
        else:
            alone.setdefault(_key(adapter), []).append(row)
    if not alone:
        return mixed(batch, adapters).cpu().numpy()
    parts = [(rows, _merged(entry, adapters[rows[0]], batch[rows])) for rows in alone.values()]
    if shared:
        parts.append((shared, mixed(batch[shared], [adapters[r] for r in shared]).cpu().numpy()))
    out = np.empty((len(adapters), parts[0][1].shape[1]), np.float32)
    for rows, logits in parts:
        out[rows] = logits
    return out


def _merged(entry: ModelEntry, adapter: Adapter | None, batch: torch.Tensor) -> np.ndarray:
    """Logits of ``batch`` on the plain model, or on ``adapter``'s merged copy."""
    model = entry.runner.model if adapter is None else entry.model_for(adapter)
    return model(batch).cpu().numpy()


def run_targets(targets: Sequence[Target]) -> list[Outcome]:
    """Run one batch of targets that share a model and width (in a worker thread); each
    target keeps its own adapter."""
    adapters = [t.adapter for t in targets]
    first = targets[0]
    return run_batch(first.entry, adapters, [t.payload for t in targets], first.width).outcomes()
