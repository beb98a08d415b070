"""Benchmark the network simulator: its speed, and its prediction against the real system.

Usage: ``python bench/sim.py [--bundle DIR --data SPEC] [--runs N] [--inputs N]``

In one run, on one bundle (a quick ``digits`` bundle is trained when ``--bundle`` is not
given), it measures:

* ``speed``: simulated requests per second of wall time for each strategy (local, offload,
  split, adaptive), on ``--devices`` (100) devices sending 30 inputs/s each for 60 simulated
  seconds over a shared LTE trace (a synthetic random walk when ../shared/traces is absent);
* ``prediction``: for each shared Mahimahi LTE trace, the real daemon and service through the
  emulator on ``--inputs`` inputs at 10/s, and the simulator on the same inputs: p50 and p95
  latency of each, and the simulator's relative error. The daemon's own per-request overhead
  is measured first over an unconstrained link (``sim.validate.calibrate``).

Each speed figure is the median of ``--runs`` runs. Prints exactly one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# Run as a script, this file's directory comes first on sys.path, and this file's name would
# hide the ``sim`` package it measures.
if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from tandem.cli import Processes
from tandem.data import load_data
from tandem.sim.des import Device, Strategy, simulate
from tandem.sim.profiles import BundleProfile, device_class, measure_bundle
from tandem.sim.scenario import SplitPoint, build_strategy
from tandem.sim.traces import TracePair, random_walk, read_pair
from tandem.sim.validate import calibrate, predict, run_real

ROOT = Path(__file__).resolve().parents[1]
MAHIMAHI = ROOT.parent / "shared" / "traces" / "mahimahi"
LTE = ("Verizon-LTE-short", "ATT-LTE-driving-2016")
DEVICES, FPS, SECONDS = 100, 30.0, 60.0
POINT = SplitPoint(width=0.5, bits=4)
SLO_MS = 100.0


def quick_bundle(out: Path) -> Path:
    """A digits bundle with short training: the simulator's figures do not need accuracy."""
    from tandem.build import build_bundle
    from tandem.config import load_recipe

    sets = ["teacher.train.epochs=2", "distill.head.epochs=2", "distill.finetune.epochs=1"]
    build_bundle(load_recipe("digits", sets), load_data("digits"), out)
    return out


def strategies(profile: BundleProfile) -> dict[str, Strategy]:
    """The four strategies on this profile, as a scenario builds them; the split at
    :data:`POINT`."""
    names = ("local", "offload-png", "split", "adaptive")
    return {name: build_strategy(name, profile, POINT, SLO_MS) for name in names}


def fleet_traces() -> TracePair:
    """A shared LTE pair, or a synthetic one of about its rate when the traces are absent."""
    if (MAHIMAHI / f"{LTE[0]}.up").exists():
        return read_pair(MAHIMAHI / LTE[0])
    return TracePair(random_walk(6.0, 1.5, 0.5, 300, seed=1), random_walk(5.0, 1.5, 0.5, 300, 2))


def speed(profile: BundleProfile, runs: int, count: int) -> dict[str, dict[str, int]]:
    """Simulated requests per wall second, per strategy (median of ``runs``)."""
    pair = fleet_traces()
    host = device_class("host").device(profile)
    devices = [
        Device(host, pair.up, pair.down, fps=FPS, poisson=True, seed=i) for i in range(count)
    ]
    out = {}
    for name, strategy in strategies(profile).items():
        rates, n = [], 0
        for _ in range(runs):
            start = time.perf_counter()
            n = len(simulate(devices, profile.cloud(), strategy, SECONDS).latency_s)
            rates.append(n / (time.perf_counter() - start))
        out[name] = {"requests": n, "requests_per_s": round(statistics.median(rates))}
    return out


def prediction(
    bundle: Path,
    profile: BundleProfile,
    x: np.ndarray,
    inputs: int,
    traces: list[str],
    tmp: Path,
) -> dict[str, Any]:
    """Real against simulated latency on each shared LTE trace (empty without the traces)."""
    calibrated = asyncio.run(calibrate(profile, bundle, x, POINT, tmp, Processes()))
    out: dict[str, Any] = {"send_overhead_ms": round(calibrated.send_overhead_ms, 2)}
    for name in traces:
        if not (MAHIMAHI / f"{name}.up").exists():
            continue
        pair = read_pair(MAHIMAHI / name)
        feed = x[: inputs + 1]
        real = asyncio.run(run_real(bundle, pair, 20.0, feed, 10.0, POINT, tmp, Processes()))
        sim = predict(calibrated, real, pair, 20.0, POINT)
        figures = {}
        for q in (50, 95):
            r, s = float(np.percentile(real.latency_ms, q)), float(np.percentile(sim, q))
            figures[f"real_p{q}_ms"], figures[f"sim_p{q}_ms"] = round(r, 2), round(s, 2)
            figures[f"p{q}_error"] = round(s / r - 1, 4)
        out[name] = figures
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="default: train a quick digits bundle")
    parser.add_argument("--data", default="digits", help="inputs for the bundle (data spec)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--inputs", type=int, default=150, help="inputs per real run")
    parser.add_argument("--devices", type=int, default=DEVICES, help="devices in the fleet")
    parser.add_argument(
        "--traces", default=",".join(LTE), help="Mahimahi pairs to predict, comma-separated"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tandem-bench-sim-") as tmp:
        bundle = args.bundle or quick_bundle(Path(tmp) / "bundle")
        x = load_data(args.data).test.x
        if len(x) < max(256, args.inputs + 1):
            raise SystemExit(f"{args.data} has {len(x)} test inputs; need more")
        profile = measure_bundle(bundle, x[:256])
        doc = {
            "bundle": profile.bundle,
            "devices": args.devices,
            "fps": FPS,
            "simulated_s": SECONDS,
            "speed": speed(profile, args.runs, args.devices),
            "prediction": prediction(
                bundle, profile, x, args.inputs, args.traces.split(","), Path(tmp)
            ),
        }
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
