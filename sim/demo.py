"""The simulator's part of ``tandem demo``: the real system over an emulated LTE link, then the
matching simulation of every strategy, written up as a report with its charts.

The link is a real LTE trace from ../shared/traces when that folder is beside the repository,
and otherwise a synthetic LTE-like one made here (the repository does not carry the shared
traces): a random walk around 4 Mbit/s up and 12 Mbit/s down, moving every half second.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from tandem.sim.profiles import measure_bundle
from tandem.sim.report import write_report
from tandem.sim.scenario import Scenario, SplitPoint, build, parse_scenario
from tandem.sim.traces import TracePair
from tandem.sim.validate import Wiring, calibrate, predict, run_real

SHARED_LTE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mahimahi"
LTE_TRACE = "Verizon-LTE-short"
SYNTHETIC = ("walk:4,1.5@0.5", "walk:12,3@0.5")
DELAY_MS, FPS, INPUTS = 20.0, 10.0, 100
POINT = SplitPoint(width=0.5, bits=4)


def link_specs() -> tuple[str, str, str]:
    """Uplink and downlink trace specs, and a name for them."""
    prefix = SHARED_LTE / LTE_TRACE
    if prefix.with_name(f"{LTE_TRACE}.up").exists():
        return f"{prefix}.up", f"{prefix}.down", f"{LTE_TRACE} (Mahimahi, ../shared)"
    return *SYNTHETIC, "synthetic LTE-like random walk"


def run(bundle: Path, x: np.ndarray, out: Path, tmp: Path, wiring: Wiring) -> dict[str, Any]:
    """Measure, emulate, simulate and report; returns the figures the demo prints. The real
    service and daemon are started by ``wiring`` (the command line's)."""
    profile = measure_bundle(bundle, x[:256])
    profile = asyncio.run(calibrate(profile, bundle, x, POINT, tmp, wiring))
    out.mkdir(parents=True, exist_ok=True)
    profile.save(out / "profile.json")
    up, down, name = link_specs()
    setup = build(_scenario(up, down), out)
    # The emulator and the simulator use the very traces the scenario built.
    pair = TracePair(setup.devices[0].up, setup.devices[0].down)
    measured = asyncio.run(
        run_real(bundle, pair, DELAY_MS, x[: INPUTS + 1], FPS, POINT, tmp, wiring)
    )
    simulated = predict(profile, measured, pair, DELAY_MS, POINT)
    doc = write_report(setup, out)
    return {
        "link": name,
        "report": str(out / "report.md"),
        "emulated_p50_ms": float(np.median(measured.latency_ms)),
        "simulated_p50_ms": float(np.median(simulated)),
        "emulated_p95_ms": float(np.percentile(measured.latency_ms, 95)),
        "simulated_p95_ms": float(np.percentile(simulated, 95)),
        "strategies": doc["strategies"],
    }


def _scenario(up: str, down: str) -> Scenario:
    return parse_scenario(
        {
            "name": "demo-lte",
            "profile": "profile.json",
            "devices": [
                {"count": 1, "class": "host", "uplink": up, "downlink": down,
                 "delay_ms": DELAY_MS, "fps": FPS},
            ],
            "strategies": ["local", "offload-png", "split", "adaptive"],
            "split": POINT.model_dump(exclude_none=True),
            "slo_ms": 100.0,
            "duration_s": 60.0,
        },
        "demo",
    )  # fmt: skip
