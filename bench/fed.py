"""Benchmark federated LoRA fine-tuning: what the adapters buy on shifted, non-IID devices.

Usage: ``python bench/fed.py [--bundle DIR --data SPEC] [--clients 8] [--rounds 10]``

One run of Flower's simulation engine (in-process, Ray backend): ``--clients`` devices, each
holding a Dirichlet(0.5) share of the training split seen through its own domain shift
(rotation, inversion, noise, low contrast, translation, blur), fine-tune the bundle's tail LoRA
(and with ``--set head-targets=auto`` its head's too) for ``--rounds`` rounds with
``--strategy``, then one personalisation round. It reports:

* the frozen bundle's accuracy on the test split seen through every client's domain, and the
  global adapter's on the same images, and the gain;
* per client, on its own held-out data (its domain and label mix): the global adapter's
  accuracy and its personal adapter's;
* the most bytes any client sent in a round, against the tail's float32 weights.

Without ``--bundle`` a quick digits bundle is trained first. Prints exactly one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def quick_bundle(out: Path) -> Path:
    """A digits bundle with short training."""
    from tandem.build import build_bundle
    from tandem.config import load_recipe
    from tandem.data import load_data

    sets = ["teacher.train.epochs=20", "distill.head.epochs=4", "distill.finetune.epochs=4"]
    build_bundle(load_recipe("digits", sets), load_data("digits"), out)
    return out


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """The figures the benchmark reports, from a federation's result."""
    personal = sorted(result["personal"]["clients"], key=lambda c: c["partition"])
    sent = max(c["bytes_up"] for r in result["rounds"] for c in r["clients"])
    return {
        "frozen_accuracy": round(result["frozen_accuracy"], 4),
        "global_accuracy": round(result["global_accuracy"], 4),
        "gain": round(result["global_accuracy"] - result["frozen_accuracy"], 4),
        "accuracy_by_round": [round(r["accuracy"], 4) for r in result["rounds"]],
        "own_domain": [
            {
                "client": c["partition"],
                "global": round(c["acc_before"], 4),
                "personal": round(c["acc_after"], 4),
            }
            for c in personal
        ],
        "clients_improved_by_personalising": sum(
            c["acc_after"] > c["acc_before"] for c in personal
        ),
        "median_own_domain_gain": round(
            statistics.median(c["acc_after"] - c["acc_before"] for c in personal), 4
        ),
        "max_bytes_up_per_round": sent,
        "tail_fp32_bytes": result["tail_fp32_bytes"],
        "bytes_up_fraction_of_tail": round(sent / result["tail_fp32_bytes"], 5),
        "failures": sum(r["failures"] + r["missing"] for r in result["rounds"]),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="default: train a quick digits bundle")
    parser.add_argument("--data", default="digits", help="the bundle's data spec")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--strategy", default="fedit", help="fedit, ffa, hetlora or flora")
    parser.add_argument("--ranks", default="", help="per-client ranks (hetlora, flora)")
    parser.add_argument("--samples", type=int, default=600, help="training rows per client")
    parser.add_argument("--epochs", type=int, default=3, help="local epochs per round")
    parser.add_argument("--update-bits", type=int, default=8)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="any other run-config setting, e.g. --set rank=8 --set lr=0.01",
    )  # fmt: skip
    args = parser.parse_args(argv)
    from tandem.federated.cli import parse_settings, simulate

    logging.getLogger("flwr").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="tandem-bench-fed-") as tmp:
        bundle = args.bundle or quick_bundle(Path(tmp) / "bundle")
        settings = {
            "bundle": str(bundle), "data": args.data, "num-rounds": args.rounds,
            "strategy": args.strategy, "ranks": args.ranks, "min-nodes": args.clients,
            "min-replies": max(1, args.clients // 2), "max-samples": args.samples,
            "local-epochs": args.epochs, "update-bits": args.update_bits,
            "out": str(Path(tmp) / "out"), **parse_settings(args.set),
        }  # fmt: skip
        start = time.perf_counter()
        result = simulate(settings, args.clients, Path(tmp) / "out")
        doc = {
            "bundle": str(bundle), "data": args.data, "clients": args.clients,
            "rounds": args.rounds, "strategy": args.strategy, "update_bits": args.update_bits,
            "settings": args.set,
            **summarise(result), "wall_s": round(time.perf_counter() - start, 1),
        }  # fmt: skip
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
