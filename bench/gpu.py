"""Training and serving on a CUDA device against the same on this machine's CPU, in one run.

Usage: ``python bench/gpu.py --bundle DIR --data SPEC [--recipe cifar10] [--device cuda]``

Refuses to run (exit status 2) where PyTorch sees no CUDA device: the figures it prints are
GPU against CPU, and a CPU-only machine has nothing to compare.

* **Training.** Images per second of the recipe's teacher in training steps (forward,
  backward, AdamW) at the recipe's batch size and memory format, on uint8 inputs of the
  bundle's shape normalised on the device, as ``tandem train`` feeds it: on the CPU in fp32,
  on CUDA in fp32 and in the mixed precision the recipe names (bf16 when it names fp32).
  Data loading is left out: it is the same on both and runs in worker processes.
* **Serving.** Samples per second of the bundle's decoder and tail (``TailRunner.infer``:
  entropy or codec decoding, the copy from page-locked memory, the forward pass) on the
  payloads the bundle's head makes of ``--data``'s test inputs, at batch sizes 1 to 512; the
  best batch on each device is reported.

Every figure is the median of ``--runs`` timed runs after a warm-up. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tandem.bundle import HeadRunner, TailRunner, read_manifest
from tandem.config import load_recipe
from tandem.data import load_data, normalize_tensor
from tandem.device import Precision, autocast, describe, grad_scaler, resolve_device, synchronize
from tandem.models import build_model

SERVE_BATCHES = (1, 8, 32, 128, 512)


def timed(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds one call of ``step`` takes: the median of ``repeats`` after one warm-up."""
    step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_rate(
    recipe_name: str,
    shape: tuple[int, ...],
    classes: int,
    device: torch.device,
    precision: Precision,
    args: argparse.Namespace,
) -> float:
    """Training images per second of ``recipe_name``'s teacher on ``device``."""
    recipe = load_recipe(recipe_name)
    cfg = recipe.teacher
    torch.manual_seed(0)
    model = build_model(cfg.arch.name, num_classes=classes, in_channels=shape[0], **cfg.arch.args)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=layout).train()  # type: ignore[call-overload]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    scaler = grad_scaler(device, precision)
    batch = cfg.train.batch_size
    pixels = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8)
    if device.type == "cuda":
        pixels = pixels.pin_memory()  # as the loader hands batches to a GPU
    labels = torch.randint(0, classes, (batch,))
    mean, std = [0.5] * shape[0], [0.25] * shape[0]

    def step() -> None:
        for _ in range(args.steps):
            x = normalize_tensor(pixels.to(device, non_blocking=True), mean, std)
            x = x.contiguous(memory_format=layout)
            with autocast(device, precision):
                loss = F.cross_entropy(model(x), labels.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    return batch * args.steps / timed(step, device, args.runs)


def serve_rates(
    bundle: Path, payloads: list[bytes], width: float, device: torch.device, runs: int
) -> dict[str, float]:
    """Samples per second of decoder + tail on ``device`` at each batch size."""
    tail = TailRunner.from_bundle(bundle, device=device)
    rates = {}
    for size in SERVE_BATCHES:
        chunk = (payloads * (size // len(payloads) + 1))[:size]
        rates[str(size)] = size / timed(partial(tail.infer, chunk, width), device, runs)
    return rates


def _best(rates: dict[str, float]) -> dict[str, Any]:
    batch = max(rates, key=lambda k: rates[k])
    return {"batch": int(batch), "samples_per_s": rates[batch]}


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print one JSON line (exit status 2 without CUDA)."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--bundle", type=Path, required=True, help="a trained bundle")
    parser.add_argument("--data", required=True, help="its data spec (the test split is used)")
    parser.add_argument("--recipe", default="cifar10", help="whose teacher to train")
    parser.add_argument("--device", default="cuda", help="the CUDA device: cuda or cuda:N")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per figure")
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed run")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device, and PyTorch sees none here", file=sys.stderr)
        return 2
    gpu, cpu = resolve_device(args.device), torch.device("cpu")
    manifest = read_manifest(args.bundle)
    shape, classes = tuple(manifest.input.shape), manifest.num_classes
    recipe = load_recipe(args.recipe)
    amp: Precision = "bf16" if recipe.precision == "fp32" else recipe.precision
    train = {
        "cpu_fp32": train_rate(args.recipe, shape, classes, cpu, "fp32", args),
        "cuda_fp32": train_rate(args.recipe, shape, classes, gpu, "fp32", args),
        f"cuda_{amp}": train_rate(args.recipe, shape, classes, gpu, amp, args),
    }
    head = HeadRunner.from_bundle(args.bundle)
    width = manifest.bottleneck.widths[-1]
    test = load_data(args.data).test
    x = test.take(range(min(512, len(test))))
    point = 0 if manifest.entropy is not None else None
    payloads = head.encode_entropy(x, width, point) if point is not None else head.encode(x, width)
    serve = {
        "cpu": serve_rates(args.bundle, payloads, width, cpu, args.runs),
        "cuda": serve_rates(args.bundle, payloads, width, gpu, args.runs),
    }
    best = {name: _best(rates) for name, rates in serve.items()}
    doc = {
        "bench": "gpu",
        "device": describe(gpu),
        "cpu_threads": torch.get_num_threads(),
        "bundle": str(args.bundle),
        "recipe": args.recipe,
        "train_images_per_s": train,
        "train_speedup": {k: v / train["cpu_fp32"] for k, v in train.items()},
        "serve_samples_per_s": serve,
        "serve_best": best,
        "serve_speedup": best["cuda"]["samples_per_s"] / best["cpu"]["samples_per_s"],
        "payload_bytes": sum(map(len, payloads)) / len(payloads),
    }
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
