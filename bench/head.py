"""Benchmark the device's head: PyTorch against ONNX Runtime, same bundle, same run.

Usage::

    python bench/head.py                                   # a quickly trained digits bundle
    python bench/head.py --bundle digits=runs/d,digits \\
        --bundle mnist=runs/m,npz:../shared/data/mnist.npz \\
        --bundle cifar10=runs/c,imagefolder:../shared/data/cifar10-jpeg

Each ``--bundle NAME=PATH,DATA`` is copied to a scratch directory (the bundle itself is left
as it is) and its head exported there (``tandem export --onnx``). Then, on ``--threads``
threads for both runtimes (default 1, a small device's core):

* ``ms_per_sample``: the head's median wall time at full width over ``--repeats`` runs,
  per sample, at batch 1 and at batch 32 of the data's test images, for ``torch`` and
  ``onnx``, and their ratio ``torch_over_onnx`` (above 1: ONNX Runtime is faster);
  ``encode_4bit`` is the next stage on the device, the 4-bit quantise+zstd payloads of
  that batch (the same code for both runtimes);
* ``identical_payloads``: the fraction of payloads whose bytes are identical between the
  two runtimes, over ``--samples`` test images at every width, for each quantise+zstd
  depth (2, 4, 8 bits) and each rate point, and ``max_abs_diff`` of the features. ONNX
  Runtime's convolutions round differently from PyTorch's (about 1e-7), which moves a
  value across a rounding edge now and then: one symbol of its payload differs, and
  decodes to the neighbouring level. The odds grow with the values per payload over the
  step, so 8 bits differ most; the per-group parameters are snapped to a grid and rarely
  move (see tandem.codec);
* ``identical_predictions``: the fraction of those samples the tail classifies the same
  from either runtime's 4-bit payloads at full width.

Prints exactly one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tandem.build import build_bundle
from tandem.bundle import HeadRunner, TailRunner
from tandem.config import load_recipe
from tandem.data import load_data
from tandem.onnx_export import export_onnx
from tandem.onnx_head import OnnxHead

QUICK_DIGITS = ["teacher.train.epochs=5", "distill.head.epochs=3", "distill.finetune.epochs=3",
                "rate.betas=[0.05, 0.5]", "eval_bits=[4]"]  # fmt: skip
BATCHES = (1, 32)
BITS = (2, 4, 8)


def median_ms(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``run`` in milliseconds, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def latency(torch_head: HeadRunner, onnx_head: OnnxHead, x: np.ndarray, repeats: int) -> dict:
    """Per-sample head latency at each batch size, both runtimes, full width."""
    width = max(torch_head.manifest.bottleneck.widths)
    out: dict[str, Any] = {}
    for batch in BATCHES:
        rows = x[:batch]
        t = median_ms(lambda rows=rows: torch_head.features(rows, width), repeats) / len(rows)
        o = median_ms(lambda rows=rows: onnx_head.features(rows, width), repeats) / len(rows)
        z = onnx_head.features(rows, width)
        e = median_ms(lambda z=z: onnx_head.pack(z, 4), repeats) / len(rows)
        out[f"batch_{batch}"] = {"torch": t, "onnx": o, "torch_over_onnx": t / o, "encode_4bit": e}
    return out


def agreement(bundle: Path, torch_head: HeadRunner, onnx_head: OnnxHead, x: np.ndarray) -> dict:
    """How often the two runtimes' payloads are byte-identical (over every width), and how
    often the tail's predictions from their 4-bit payloads are equal (full width)."""
    widths = torch_head.manifest.bottleneck.widths
    same: dict[str, list[bool]] = {}
    largest = 0.0
    for width in widths:
        ours, theirs = onnx_head.features(x, width), torch_head.features(x, width)
        largest = max(largest, float(np.abs(ours - theirs).max()))
        pairs = {f"{bits}-bit": (onnx_head.pack(ours, bits), torch_head.pack(theirs, bits))
                 for bits in BITS}  # fmt: skip
        for point in range(len(torch_head.points)):
            pairs[f"rate point {point}"] = (
                onnx_head.pack_entropy(ours, width, point),
                torch_head.pack_entropy(theirs, width, point),
            )
        for kind, (a, b) in pairs.items():
            same.setdefault(kind, []).extend(p == q for p, q in zip(a, b, strict=True))
    # The loop ends at full width (widths ascend): its 4-bit payloads are the ones served.
    tail = TailRunner.from_bundle(bundle)
    predicted = [tail.infer(payloads, widths[-1]).argmax(1) for payloads in pairs["4-bit"]]
    return {
        "widths": widths,
        "samples": len(x),
        "max_abs_diff": largest,
        "identical_payloads": {kind: float(np.mean(flags)) for kind, flags in same.items()},
        "identical_predictions": float(np.mean(predicted[0] == predicted[1])),
    }


def measure(name: str, bundle: Path, data: str, args: argparse.Namespace, tmp: Path) -> dict:
    """One bundle's row: exported in a scratch copy, then timed and compared."""
    copy = tmp / name
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("checkpoint", "onnx"))
    export_onnx(copy)
    torch_head = HeadRunner.from_bundle(copy)
    onnx_head = OnnxHead.from_bundle(copy, threads=args.threads)
    test = load_data(data).test
    x = test.take(range(min(args.samples, len(test))))
    return {
        "bundle": str(bundle),
        "input": list(torch_head.manifest.input.shape),
        "head_mflops": round(torch_head.manifest.head_flops / 1e6, 2),
        "ms_per_sample": latency(torch_head, onnx_head, x, args.repeats),
        **agreement(copy, torch_head, onnx_head, x),
    }


def _bundles(args: argparse.Namespace, tmp: Path) -> list[tuple[str, Path, str]]:
    """The (name, path, data) to measure: as given, or a quickly trained digits bundle."""
    if not args.bundle:
        out = tmp / "trained-digits"
        build_bundle(load_recipe("digits", QUICK_DIGITS), load_data("digits"), out)
        return [("digits", out, "digits")]
    chosen = []
    for item in args.bundle:
        name, _, rest = item.partition("=")
        path, _, data = rest.partition(",")
        if not (name and path and data):
            raise SystemExit(f"--bundle {item!r}: expected NAME=PATH,DATA")
        chosen.append((name, Path(path), data))
    return chosen


def main(argv: list[str] | None = None) -> int:
    """Measure every bundle given (or a quickly trained digits one); print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--bundle",
        action="append",
        default=[],
        metavar="NAME=PATH,DATA",
        help="a bundle and its data spec (repeatable; default: digits, trained)",
    )
    p.add_argument("--threads", type=int, default=1, help="threads for both runtimes")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per batch size")
    p.add_argument("--samples", type=int, default=2000,
                   help="test images compared between the runtimes")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="tandem-bench-head-") as scratch:
        tmp = Path(scratch)
        rows = {name: measure(name, path, data, args, tmp)
                for name, path, data in _bundles(args, tmp)}  # fmt: skip
    doc = {"bench": "head", "threads": args.threads, "repeats": args.repeats,
           "torch": torch.__version__, "bundles": rows}  # fmt: skip
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
