"""Decoder + tail over one batch: what a worker thread runs.

Each payload is decoded on its own, so one corrupt request fails alone while the rest of
its batch is answered. Shapes were checked against the bundle when the requests arrived.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
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
    """Per-request scores (or why that request failed) and the batch's stage times."""

    results: list[Scores | BadFeatures]
    decode_s: float
    compute_s: float


def run_batch(entry: ModelEntry, adapter: Adapter | None, payloads: Sequence[bytes]) -> BatchOutput:
    """Decode ``payloads`` (same width) and run decoder + tail, with ``adapter`` if given."""
    start = time.perf_counter()
    max_elements = entry.runner.max_elements
    errors: dict[int, BadFeatures] = {}
    arrays: list[np.ndarray] = []
    for i, payload in enumerate(payloads):
        try:
            arrays.append(codec.decode(payload, max_elements=max_elements))
        except codec.CodecError as exc:
            errors[i] = BadFeatures(str(exc))
    mid = time.perf_counter()
    computed: Iterator[Scores | BadFeatures] = iter([])
    if arrays:
        batch = torch.from_numpy(np.stack(arrays).astype(np.float32))
        computed = iter(_scores(_forward(entry, adapter, batch)))
    results = [errors[i] if i in errors else next(computed) for i in range(len(payloads))]
    return BatchOutput(results, mid - start, time.perf_counter() - mid)


def _scores(logits: np.ndarray) -> list[Scores | BadFeatures]:
    # Finite features can still overflow the tail (the codec allows values near the float32
    # limit): such a request gets an error, not NaN scores.
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
    out = run_batch(targets[0].entry, targets[0].adapter, [t.payload for t in targets])
    return [(r, out.decode_s, out.compute_s) for r in out.results]
