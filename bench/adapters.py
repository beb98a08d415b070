"""Benchmark many LoRA adapters in one batch against no adapter, side by side.

Usage: ``python bench/adapters.py [--bundle DIR --data SPEC] [--runs N] [--requests N]
[--seconds S]``

In one run, on one bundle (a quick ``digits`` bundle is trained when ``--bundle`` is not
given), it publishes :data:`ADAPTERS` random rank-4 LoRA adapters into a copy of the bundle.
Each targets what a task adapter of a ResNet usually tunes: every Conv2d and Linear of the
tail's last stage (both blocks' convolutions and the downsample of ``layer4``) and the
classifier (``fc``), as ``federated.lora.resolve_targets(..., "auto")`` picks them. Requests
name 0 (no adapter), 1, 10 or 100 distinct adapters, round robin, and for each mix it
measures:

* ``in_process``: decode + decoder + tail through ``cloud.inference.run_batch``, the code
  the server's workers run, on batches of 64 consecutive requests (the server's maximum
  batch below), on one thread: samples/s. This is the compute alone, where the cost of
  batched LoRA shows. The mixes take turns, one pass over the inputs each, until each has
  had ``--seconds`` of compute.
* ``service``: ``tandem cloud serve`` as its own process (one worker, one torch thread,
  batches of up to 64, 2 ms maximum delay), with each compute backend (a worker thread, a
  worker process), loaded from this process by 32 ``InferStream`` clients with four
  requests outstanding each (as the edge daemon pipelines): requests/s, p50/p99. On a small
  tail on two cores, gRPC and the server's own Python take most of the time here, so the
  ratios are closer to 1 than the compute's. Within a run the mixes are measured one after
  another, each run starting at the next mix.

Ratios: each mix's figure over the no-adapter figure of the same kind, measured in the same
invocation (the issue's target is 0.7 at 100 adapters). Each figure is the median of
``--runs`` runs. Prints exactly one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from tandem.adapters import Adapter, save_adapter
from tandem.bundle import HeadRunner, TailRunner, read_manifest
from tandem.cloud.inference import run_batch
from tandem.cloud.repository import ModelEntry, ModelRepository
from tandem.data import load_data
from tandem.federated.lora import resolve_targets
from tandem.protocol import to_message
from tandem.wire.v1 import split_inference_pb2 as pb
from tandem.wire.v1 import tensor_pb2

# bench/ is not a package: the server and load helpers come from the sibling benchmark.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import CLIENTS, DEPTH, process, stream_load

ADAPTERS, RANK, ALPHA = 100, 4, 8.0
MIXES = (0, 1, 10, 100)  # distinct adapters in the request mix; 0: none
MAX_BATCH = 64
PAYLOADS = 512  # distinct inputs at most, sent round robin


def quick_bundle(out: Path) -> Path:
    """A digits bundle with short training: throughput does not need accuracy."""
    from tandem.build import build_bundle
    from tandem.config import load_recipe

    sets = ["teacher.train.epochs=2", "distill.head.epochs=2", "distill.finetune.epochs=1"]
    build_bundle(load_recipe("digits", sets), load_data("digits"), out)
    return out


def publish(bundle: Path, model: nn.Module, targets: list[str]) -> list[str]:
    """Write :data:`ADAPTERS` seeded random adapters into ``bundle``; return their names."""
    gen = torch.Generator().manual_seed(0)
    names = [f"bench-{i:03d}" for i in range(ADAPTERS)]
    for name in names:
        lora = {t: _pair(model.get_submodule(t), gen) for t in targets}
        path = bundle / "adapters" / name / "1"
        save_adapter(path, lora=lora, rank=RANK, alpha=ALPHA, target_modules=targets)
    return names


def _pair(module: nn.Module, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # Small values keep the adapted logits finite; the values do not change the cost.
    if isinstance(module, nn.Linear):
        a = torch.randn(RANK, module.in_features, generator=gen)
        b = torch.randn(module.out_features, RANK, generator=gen)
    else:
        assert isinstance(module, nn.Conv2d)
        a = torch.randn(RANK, module.in_channels, *module.kernel_size, generator=gen)
        b = torch.randn(module.out_channels, RANK, 1, 1, generator=gen)
    return a * 0.05, b * 0.05


def mix(names: list[str], distinct: int, n: int) -> list[str]:
    """The adapter each of ``n`` requests names: ``distinct`` of them round robin ("": none)."""
    return [names[i % distinct] if distinct else "" for i in range(n)]


# ------------------------------------------------------------------ in process


def in_process(repo: Path, payloads: list[bytes], names: list[str], seconds: float) -> dict:
    """Samples/s of ``run_batch`` per mix, over about ``seconds`` of compute each.

    The mixes take turns, one pass over the payloads each, so a noisy neighbour slows them
    alike rather than whichever mix it happened to overlap.
    """
    repository = ModelRepository(repo)
    repository.scan()
    entry = repository.models()[0]
    passes = {}
    for distinct in MIXES:
        rows: list[Adapter | None] = [
            entry.adapter(n) if n else None for n in mix(names, distinct, len(payloads))
        ]
        passes[distinct] = [
            (rows[i : i + MAX_BATCH], payloads[i : i + MAX_BATCH])
            for i in range(0, len(payloads), MAX_BATCH)
        ]
        _run_pass(entry, passes[distinct])  # unmeasured: builds merged copies and the pool
    spent = dict.fromkeys(MIXES, 0.0)
    rounds = 0
    while min(spent.values()) < seconds:
        for distinct, batches in passes.items():
            spent[distinct] += _run_pass(entry, batches)
        rounds += 1
    return {str(d): rounds * len(payloads) / spent[d] for d in MIXES}


def _run_pass(entry: ModelEntry, batches: list[tuple[list[Adapter | None], list[bytes]]]) -> float:
    """Seconds to run every batch once (the payloads are sent at the smallest width)."""
    width = min(entry.manifest.bottleneck.widths)
    start = time.perf_counter()
    for adapters, batch in batches:
        run_batch(entry, adapters, batch, width)
    return time.perf_counter() - start


# ------------------------------------------------------------------ through the service


def _serve_command(repo: Path, compute: str) -> list[str]:
    return [
        sys.executable, "-m", "tandem.cli", "cloud", "serve", "--json", "--models", str(repo),
        "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--workers", "1",
        "--compute", compute, "--torch-threads", "1", "--max-batch", str(MAX_BATCH),
        "--max-delay-ms", "2",
    ]  # fmt: skip


def _requests(
    model: str,
    width: float,
    features: list[tensor_pb2.EncodedTensor],
    adapters: list[str],
    tag: str,
) -> list[pb.InferRequest]:
    return [
        pb.InferRequest(
            request_id=f"{tag}-{i}", model=model, width=width, adapter=adapter,
            features=features[i % len(features)],
        )
        for i, adapter in enumerate(adapters)
    ]  # fmt: skip


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}


def service(
    repo: Path, model: str, width: float, payloads: list[bytes], names: list[str], runs: int, n: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Pipelined-stream figures per compute backend and mix (see the module docstring)."""
    features = [to_message(p) for p in payloads]

    def load(address: str, distinct: int, count: int, tag: str) -> dict[str, float]:
        requests = _requests(model, width, features, mix(names, distinct, count), tag)
        return asyncio.run(stream_load(address, requests, DEPTH))

    out = {}
    for compute in ("threads", "processes"):
        with process(_serve_command(repo, compute)) as ready:
            address = ready["address"]
            # Unmeasured: a worker process loads the adapters, and every mix builds what it
            # reuses (merged copies, the stacked factors) on its first batches.
            for distinct in MIXES:
                load(address, distinct, n, f"w{distinct}")
            figures: dict[int, list[dict[str, float]]] = {d: [] for d in MIXES}
            for r in range(runs):
                # Each run starts at the next mix: no mix is always the one measured first.
                for distinct in MIXES[r % len(MIXES) :] + MIXES[: r % len(MIXES)]:
                    figures[distinct].append(load(address, distinct, n, f"m{r}-{distinct}"))
        out[compute] = {str(d): _median(f) for d, f in figures.items()}
    return out


# ------------------------------------------------------------------ the whole benchmark


def _ratios(figures: dict[str, float]) -> dict[str, float]:
    return {k: round(v / figures["0"], 3) for k, v in figures.items() if k != "0"}


def measure(bundle: Path, data: str, runs: int, n: int, seconds: float, tmp: Path) -> dict:
    """Every figure of the benchmark; see the module docstring."""
    torch.set_num_threads(1)
    manifest = read_manifest(bundle)
    width, bits = min(manifest.bottleneck.widths), manifest.codec.bits
    x = load_data(data).test.x[:PAYLOADS]
    payloads = HeadRunner.from_bundle(bundle).encode(x, width, bits)
    repo = tmp / "repo"
    copy = repo / manifest.name
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("checkpoint", "adapters"))
    tail = TailRunner.from_bundle(bundle).model
    targets = resolve_targets(tail, "auto")
    names = publish(copy, tail, targets)

    process_runs = [in_process(repo, payloads, names, seconds) for _ in range(runs)]
    compute = {k: statistics.median(r[k] for r in process_runs) for k in process_runs[0]}
    served = service(repo, manifest.name, width, payloads, names, runs, n)
    return {
        "bundle": manifest.name, "width": width, "bits": bits, "runs": runs, "requests": n,
        "cpu_count": os.cpu_count(), "max_batch": MAX_BATCH, "clients": CLIENTS, "depth": DEPTH,
        "adapters": {"count": ADAPTERS, "rank": RANK, "alpha": ALPHA, "targets": targets},
        "in_process": {"samples_per_s": {k: round(v, 1) for k, v in compute.items()}},
        "service": served,
        "ratios": {
            "in_process": _ratios(compute),
            **{
                f"service_{backend}": _ratios({k: f["rps"] for k, f in mixes.items()})
                for backend, mixes in served.items()
            },
        },
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="default: train a quick digits bundle")
    parser.add_argument("--data", default="digits", help="inputs for the bundle (data spec)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000, help="requests per service load")
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="compute time per in-process figure and run"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tandem-bench-adapters-") as tmp:
        bundle = args.bundle or quick_bundle(Path(tmp) / "bundle")
        doc = measure(bundle, args.data, args.runs, args.requests, args.seconds, Path(tmp))
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
