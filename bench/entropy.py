"""Codec v2 on a trained bundle's own bottleneck, against the quantise+zstd codec and the head.

Usage: ``python bench/entropy.py --bundle DIR --data SPEC [--runs N] [--samples N]``

The bundle must have rate points (``rate.betas``). The first ``--samples`` (64) test inputs
go through the bundle's head once; then, in the same runs, for each width:

* each rate point: :meth:`RatePoint.encode` (quantize with the point's gain and medians,
  range-code) and :meth:`RatePoint.decode` (range-decode, dequantize), one sample at a time
  as the device and the service do, in microseconds per sample;
* the quantise+zstd codec (``tandem.codec``) at 4 and 2 bits on the same float features;
* the head itself (normalise + encoder) on one sample (batch 1, the device's latency for a
  single input) and per sample in a batch of ``--samples``.

Every figure is the median over ``--runs``; ``entropy_encode_vs_head`` is the rate points'
slowest encode over the head's batch-1 time. Prints exactly one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tandem import codec
from tandem.bundle import HeadRunner
from tandem.data import load_data

V1_BITS = (4, 2)
MIN_RUN_SECONDS = 0.05


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    """Microseconds per call of ``fn`` that itself makes ``calls`` calls, timed over at least
    MIN_RUN_SECONDS."""
    repeats, start = 0, time.perf_counter()
    while True:
        fn()
        repeats += 1
        elapsed = time.perf_counter() - start
        if elapsed >= MIN_RUN_SECONDS:
            return elapsed / (repeats * calls) * 1e6


def _encode_all(encode: Callable[[np.ndarray], bytes], z: np.ndarray) -> list[bytes]:
    return [encode(sample) for sample in z]


def _decode_all(decode: Callable[[bytes], object], payloads: list[bytes]) -> list[object]:
    return [decode(p) for p in payloads]


def width_figures(head: HeadRunner, x: np.ndarray, width: float, runs: int) -> dict[str, Any]:
    """The figures of one width: every coder's and the head's µs per sample, and bytes."""
    n, z = len(x), head.features(x, width)
    shape = (int(z.shape[1]), int(z.shape[2]), int(z.shape[3]))
    coders: dict[str, tuple[Callable[[np.ndarray], bytes], Callable[[bytes], object]]] = {
        f"p{i}": (
            partial(rate.encode, index=i, width_index=head.manifest.bottleneck.widths.index(width)),
            partial(rate.decode, shape=shape),
        )
        for i, rate in enumerate(head.points)
    }
    for bits in V1_BITS:
        coders[f"v1_{bits}"] = (partial(codec.encode, bits=bits), codec.decode)
    timers: dict[str, tuple[Callable[[], object], int]] = {
        "head_batch1": (partial(head.features, x[:1], width), 1),
        "head_batched": (partial(head.features, x, width), n),
    }
    sizes = {}
    for key, (encode, decode) in coders.items():
        payloads = _encode_all(encode, z)
        sizes[key] = round(float(np.mean([len(p) for p in payloads])), 2)
        timers[f"{key}_encode"] = (partial(_encode_all, encode, z), n)
        timers[f"{key}_decode"] = (partial(_decode_all, decode, payloads), n)
    us = {
        key: round(statistics.median(per_call_us(fn, calls) for _ in range(runs)), 1)
        for key, (fn, calls) in timers.items()
    }
    slowest = max(us[f"p{i}_encode"] for i in range(len(head.points)))
    return {
        "us_per_sample": us,
        "bytes_per_sample": sizes,
        "entropy_encode_vs_head": round(slowest / us["head_batch1"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle with rate points")
    parser.add_argument("--data", required=True, help="digits | npz:PATH | imagefolder:DIR")
    parser.add_argument("--runs", type=int, default=5, help="runs to take the median of")
    parser.add_argument("--samples", type=int, default=64, help="test inputs coded per run")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.samples < 1:
        parser.error("--runs and --samples must be >= 1")
    torch.set_num_threads(1)  # a device's head runs on one core here
    head = HeadRunner.from_bundle(args.bundle)
    if not head.points:
        parser.error(f"{args.bundle} has no rate points: train it with rate.betas")
    x = load_data(args.data).test.x[: args.samples]
    result = {
        "bench": "entropy",
        "bundle": str(args.bundle),
        "samples": len(x),
        "runs": args.runs,
        "stat": "median",
        "torch_threads": 1,
        "betas": head.manifest.entropy.betas if head.manifest.entropy else [],
        "widths": {
            str(w): width_figures(head, x, w, args.runs) for w in head.manifest.bottleneck.widths
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
