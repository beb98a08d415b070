"""Decoder + tail over one batch: what a worker thread runs.

Each payload is decoded on its own, so one corrupt request fails alone while the rest of
its batch is answered. Shapes were checked against the bundle when the requests arrived.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cloud.adapters import Adapter
from cloud.repository import ModelEntry
from tandem import codec


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


def run_batch(entry: ModelEntry, adapter: Adapter | None, payloads: Sequence[bytes]) -> BatchOutput:
    """Decode ``payloads`` (same width) and run decoder + tail, with ``adapter`` if given."""
    start = time.perf_counter()
    max_elements = entry.runner.max_elements
    errors: dict[int, str] = {}
    arrays: list[np.ndarray] = []
    for i, payload in enumerate(payloads):
        try:
            arrays.append(codec.decode(payload, max_elements=max_elements))
        except codec.CodecError as exc:
            errors[i] = str(exc)
    mid = time.perf_counter()
    logits = np.zeros((0, 0), np.float32)
    if arrays:
        batch = torch.from_numpy(np.stack(arrays).astype(np.float32))
        logits = _forward(entry, adapter, batch)
    return BatchOutput(logits, errors, mid - start, time.perf_counter() - mid)


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


@torch.inference_mode()
def _forward(entry: ModelEntry, adapter: Adapter | None, batch: torch.Tensor) -> np.ndarray:
    model = entry.runner.model if adapter is None else entry.model_for(adapter)
    return model(batch).numpy()


def run_targets(targets: Sequence[Target]) -> list[Outcome]:
    """Run one batch of targets that share a model, width and adapter (in a worker thread)."""
    return run_batch(targets[0].entry, targets[0].adapter, [t.payload for t in targets]).outcomes()
