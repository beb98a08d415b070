"""Benchmark tandem.codec against plain zstd on a batch of bottleneck-like tensors.

Usage: ``python bench/codec.py [--runs N] [--seed S]``

The input is a (32, 12, 28, 28) float32 batch: seeded standard-normal values with a
per-channel scale and shift, passed through ReLU (about half the values are exactly
zero, as in a post-activation bottleneck).  For each of 8, 4 and 2 bits the codec's
encode and decode throughput (MB/s of fp32 input, MB = 1e6 bytes, median over the
runs) and compression ratio (fp32 bytes / encoded bytes) are reported, next to zstd
(level 3) compressing and decompressing the raw fp32 bytes in the same runs.
Prints exactly one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zstandard

from tandem.codec import decode, encode

SHAPE = (32, 12, 28, 28)
BITS = (8, 4, 2)
ZSTD_LEVEL = 3
MIN_RUN_SECONDS = 0.05


def make_batch(seed: int) -> np.ndarray:
    """A ReLU'd, per-channel scaled and shifted normal batch of SHAPE."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    scale = rng.uniform(0.5, 2.0, size=(1, SHAPE[1], 1, 1)).astype(np.float32)
    shift = rng.uniform(-0.5, 0.5, size=(1, SHAPE[1], 1, 1)).astype(np.float32)
    return np.maximum(x * scale + shift, 0.0)


def timed(fn: Callable[[], object]) -> float:
    """Seconds per call, looping until at least MIN_RUN_SECONDS have elapsed."""
    fn()  # warm caches and thread-local contexts
    loops = 0
    start = time.perf_counter()
    while True:
        fn()
        loops += 1
        elapsed = time.perf_counter() - start
        if elapsed >= MIN_RUN_SECONDS:
            return elapsed / loops


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs to take the median of")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")

    x = make_batch(args.seed)
    raw = x.tobytes()
    mb = x.nbytes / 1e6
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    dctx = zstandard.ZstdDecompressor()

    samples: dict[str, dict[str, list[float]]] = {
        str(b): {"encode": [], "decode": []} for b in BITS
    }
    samples["zstd_raw"] = {"encode": [], "decode": []}
    sizes: dict[str, int] = {}
    for _ in range(args.runs):
        for b in BITS:
            data = encode(x, b)
            sizes[str(b)] = len(data)
            samples[str(b)]["encode"].append(mb / timed(functools.partial(encode, x, b)))
            samples[str(b)]["decode"].append(mb / timed(functools.partial(decode, data)))
        frame = cctx.compress(raw)
        sizes["zstd_raw"] = len(frame)
        samples["zstd_raw"]["encode"].append(mb / timed(lambda: cctx.compress(raw)))
        samples["zstd_raw"]["decode"].append(mb / timed(functools.partial(dctx.decompress, frame)))

    def summary(key: str) -> dict[str, float]:
        return {
            "encode_MBps": round(statistics.median(samples[key]["encode"]), 1),
            "decode_MBps": round(statistics.median(samples[key]["decode"]), 1),
            "ratio": round(x.nbytes / sizes[key], 3),
            "bytes": sizes[key],
        }

    codec = {str(b): summary(str(b)) for b in BITS}
    zstd_raw = summary("zstd_raw")
    speedup = {
        str(b): {
            "encode": round(codec[str(b)]["encode_MBps"] / zstd_raw["encode_MBps"], 2),
            "decode": round(codec[str(b)]["decode_MBps"] / zstd_raw["decode_MBps"], 2),
            "ratio": round(codec[str(b)]["ratio"] / zstd_raw["ratio"], 2),
        }
        for b in BITS
    }
    result: dict[str, Any] = {
        "bench": "codec",
        "shape": list(SHAPE),
        "dtype": "float32",
        "input_bytes": x.nbytes,
        "data": f"relu(normal*U(0.5,2)+U(-0.5,0.5)) per channel, seed {args.seed}, "
        f"{float((x == 0).mean()):.3f} zeros",
        "runs": args.runs,
        "MB": 1e6,
        "stat": "median",
        "zstd_level": ZSTD_LEVEL,
        "codec": codec,
        "zstd_raw": zstd_raw,
        "speedup_vs_zstd": speedup,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
