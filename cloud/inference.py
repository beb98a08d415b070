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
from torch.func import functional_call

from cloud.adapters import Adapter
from cloud.repository import ModelEntry
from tandem import codec


class BadFeatures(ValueError):
    """Features that fail to decode, or that drive the tail out of the float range."""


@dataclass
class BatchOutput:
    """Per-request logits (or the codec error that request raised) and the stage times."""

    results: list[np.ndarray | BadFeatures]
    decode_s: float
    compute_s: float


def run_batch(entry: ModelEntry, adapter: Adapter | None, payloads: Sequence[bytes]) -> BatchOutput:
    """Decode ``payloads`` (same width) and run decoder + tail, with ``adapter`` if given."""
    start = time.perf_counter()
    max_elements = entry.runner.max_elements
    decoded: list[np.ndarray | BadFeatures] = []
    for payload in payloads:
        try:
            decoded.append(codec.decode(payload, max_elements=max_elements))
        except codec.CodecError as exc:
            decoded.append(BadFeatures(str(exc)))
    good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
    mid = time.perf_counter()
    results: list[np.ndarray | BadFeatures] = list(decoded)
    if good:
        arrays = [d for d in decoded if isinstance(d, np.ndarray)]
        batch = torch.from_numpy(np.stack(arrays).astype(np.float32))
        logits = _forward(entry, adapter, batch)
        # Finite features can still overflow the tail (the codec allows values near the
        # float32 limit): such a request gets an error, not NaN scores.
        finite = np.isfinite(logits).all(axis=1)
        for row, i in enumerate(good):
            ok = finite[row]
            results[i] = logits[row] if ok else BadFeatures("the tail's output is not finite")
    return BatchOutput(results, mid - start, time.perf_counter() - mid)


@torch.inference_mode()
def _forward(entry: ModelEntry, adapter: Adapter | None, batch: torch.Tensor) -> np.ndarray:
    model = entry.runner.model
    if adapter is None:
        return model(batch).numpy()
    return functional_call(model, entry.merged(adapter), (batch,), strict=False).numpy()
