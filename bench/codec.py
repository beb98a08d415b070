"""Benchmark tandem.codec against plain zstd on a batch of bottleneck-like tensors.

Usage: ``python bench/codec.py [--runs N] [--seed S]``

The input is a (32, 12, 28, 28) float32 batch: seeded standard-normal values with a
per-channel scale and shift, passed through ReLU (about half the values are exactly
zero, as in a post-activation bottleneck).  For each of 8, 4 and 2 bits the codec's
encode and decode throughput (MB/s of fp32 input, MB = 1e6 bytes, median over the
runs) and compression ratio (fp32 bytes / encoded bytes) are reported, next to zstd
(level 3) compressing and decompressing the raw fp32 bytes in the same runs.

The same runs time codec v2 (:mod:`tandem.entropy_codec`) on 64 MNIST-like bottleneck
samples of shape (8, 7, 7): integer symbols drawn from seeded per-channel tables
(discretized Laplace over 16 values, about 2.3 bits of entropy per symbol).  Each sample
is encoded and decoded on its own, as the edge sends it; microseconds per sample (median
over the runs), mean bytes per sample (header included) and the samples' information
content are reported under ``entropy``, next to the v1 path (``tandem.codec.encode``,
quantize + zstd, at 4 and 2 bits) on float32 copies of the same samples.
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

from tandem import entropy_codec
from tandem.codec import decode, encode

SHAPE = (32, 12, 28, 28)
BITS = (8, 4, 2)
ZSTD_LEVEL = 3
MIN_RUN_SECONDS = 0.05

ENTROPY_SHAPE = (64, 8, 7, 7)  # samples, channels, height, width
ENTROPY_WIDTH = 16  # symbols per channel: -8..7
V1_BITS = (4, 2)


def make_batch(seed: int) -> np.ndarray:
    """A ReLU'd, per-channel scaled and shifted normal batch of SHAPE."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    scale = rng.uniform(0.5, 2.0, size=(1, SHAPE[1], 1, 1)).astype(np.float32)
    shift = rng.uniform(-0.5, 0.5, size=(1, SHAPE[1], 1, 1)).astype(np.float32)
    return np.maximum(x * scale + shift, 0.0)


def make_entropy_tables(seed: int) -> entropy_codec.EntropyTables:
    """Per-channel discretized Laplace tables (scale U(0.6, 1.5), centre U(-0.5, 0.5))."""
    rng = np.random.default_rng(seed)
    channels, width = ENTROPY_SHAPE[1], ENTROPY_WIDTH
    total = 1 << entropy_codec.PRECISION
    values = np.arange(width) - width // 2
    freqs = np.zeros((channels, width), np.uint32)
    for c in range(channels):
        pmf = np.exp(-np.abs(values - rng.uniform(-0.5, 0.5)) / rng.uniform(0.6, 1.5))
        f = np.floor(pmf / pmf.sum() * (total - width)).astype(np.int64) + 1
        f[int(np.argmax(f))] += total - int(f.sum())
        freqs[c] = f
    offset = np.full(channels, -(width // 2), np.int32)
    return entropy_codec.EntropyTables(freqs, offset, np.full(channels, width, np.int32))


def make_symbols(tables: entropy_codec.EntropyTables, seed: int) -> np.ndarray:
    """ENTROPY_SHAPE int32 symbols drawn from the tables' own distributions."""
    rng = np.random.default_rng(seed + 1)
    n, channels, h, w = ENTROPY_SHAPE
    out = np.empty(ENTROPY_SHAPE, np.int32)
    for c in range(channels):
        p = tables.freqs[c].astype(np.float64) / (1 << entropy_codec.PRECISION)
        out[:, c] = rng.choice(len(p), size=(n, h, w), p=p) + int(tables.offset[c])
    return out


def information_bits(symbols: np.ndarray, tables: entropy_codec.EntropyTables) -> float:
    """Total -log2 probability of ``symbols`` (N, C, H, W) under ``tables``."""
    n, channels = symbols.shape[:2]
    cols = symbols.reshape(n, channels, -1) - tables.offset[None, :, None]
    f = tables.freqs[np.arange(channels)[None, :, None], cols].astype(np.float64)
    return float(-np.log2(f / (1 << entropy_codec.PRECISION)).sum())


def encode_each_v2(symbols: np.ndarray, tables: entropy_codec.EntropyTables) -> list[bytes]:
    """Codec v2 messages, one per sample (operating point 0)."""
    return [entropy_codec.encode(s, tables, 0) for s in symbols]


def decode_each_v2(
    messages: list[bytes], tables: entropy_codec.EntropyTables, shape: tuple[int, int, int]
) -> list[np.ndarray]:
    """Decode codec v2 messages of ``shape`` each."""
    return [entropy_codec.decode(m, tables, shape) for m in messages]


def encode_each_v1(floats: np.ndarray, bits: int) -> list[bytes]:
    """Codec v1 messages (quantize + zstd), one per sample."""
    return [encode(x, bits) for x in floats]


def decode_each_v1(messages: list[bytes]) -> list[np.ndarray]:
    """Decode codec v1 messages."""
    return [decode(m) for m in messages]


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

    tables = make_entropy_tables(args.seed)
    symbols = make_symbols(tables, args.seed)
    floats = symbols.astype(np.float32)
    k, h, w = (int(d) for d in symbols.shape[1:])
    v2 = encode_each_v2(symbols, tables)
    decoded = decode_each_v2(v2, tables, (k, h, w))
    if not all(np.array_equal(y, s) for y, s in zip(decoded, symbols, strict=True)):
        raise RuntimeError("codec v2 did not round-trip the benchmark samples")
    v1 = {b: encode_each_v1(floats, b) for b in V1_BITS}
    per_sample: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "v2": (
            functools.partial(encode_each_v2, symbols, tables),
            functools.partial(decode_each_v2, v2, tables, (k, h, w)),
        )
    }
    for b in V1_BITS:
        per_sample[str(b)] = (
            functools.partial(encode_each_v1, floats, b),
            functools.partial(decode_each_v1, v1[b]),
        )
    us: dict[str, dict[str, list[float]]] = {
        "encode": {key: [] for key in per_sample},
        "decode": {key: [] for key in per_sample},
    }
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
        for key, (enc_fn, dec_fn) in per_sample.items():
            us["encode"][key].append(timed(enc_fn) / len(symbols) * 1e6)
            us["decode"][key].append(timed(dec_fn) / len(symbols) * 1e6)

    def summary(key: str) -> dict[str, float]:
        return {
            "encode_MBps": round(statistics.median(samples[key]["encode"]), 1),
            "decode_MBps": round(statistics.median(samples[key]["decode"]), 1),
            "ratio": round(x.nbytes / sizes[key], 3),
            "bytes": sizes[key],
        }

    def per_sample_us(what: str, key: str) -> float:
        return round(statistics.median(us[what][key]), 1)

    def entropy_summary() -> dict[str, Any]:
        n = len(symbols)
        p = tables.freqs.astype(np.float64) / (1 << entropy_codec.PRECISION)
        table_entropy = float(-(p * np.log2(p)).sum(axis=1).mean())
        return {
            "shape": list(ENTROPY_SHAPE),
            "data": f"discretized Laplace symbols in [-8, 7], 8 channel tables, seed {args.seed}",
            "table_entropy_bits_per_symbol": round(table_entropy, 3),
            "encode_us_per_sample": per_sample_us("encode", "v2"),
            "decode_us_per_sample": per_sample_us("decode", "v2"),
            "bytes_per_sample": round(sum(map(len, v2)) / n, 2),
            "entropy_bits_per_sample": round(information_bits(symbols, tables) / n, 1),
            "v1": {
                str(b): {
                    "encode_us_per_sample": per_sample_us("encode", str(b)),
                    "decode_us_per_sample": per_sample_us("decode", str(b)),
                    "bytes_per_sample": round(sum(map(len, v1[b])) / n, 2),
                    "max_abs_error": max(
                        float(np.abs(y - x).max())
                        for y, x in zip(decode_each_v1(v1[b]), floats, strict=True)
                    ),
                }
                for b in V1_BITS
            },
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
        "entropy": entropy_summary(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
