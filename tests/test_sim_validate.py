"""The simulator predicts the real daemon and service over the emulated LTE link."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from serving import ROOT

from tandem.cli import Processes
from tandem.data import load_data
from tandem.sim.profiles import measure_bundle
from tandem.sim.scenario import SplitPoint
from tandem.sim.traces import read_pair
from tandem.sim.validate import calibrate, predict, run_real

LTE = ROOT.parent / "shared" / "traces" / "mahimahi" / "Verizon-LTE-short"
POINT = SplitPoint(width=0.5, bits=4)


def test_simulated_p50_is_within_15_percent_of_the_real_one(
    tmp_path: Path, digits_bundle: Path
) -> None:
    if not LTE.with_suffix(".up").exists():
        pytest.skip("../shared/traces is not here")
    x = load_data("digits").test.x
    profile = measure_bundle(digits_bundle, x[:256])
    calibrated = asyncio.run(calibrate(profile, digits_bundle, x, POINT, tmp_path, Processes()))
    assert calibrated.send_overhead_ms > 0, "the daemon costs something beyond head and tail"
    # Counted at the emulator's sockets: framing beyond the message, and an answer's bytes.
    assert calibrated.frame_overhead_bytes > 9, "an HTTP/2 DATA frame header at least"
    assert calibrated.response_bytes is not None and calibrated.response_bytes > 40
    pair = read_pair(LTE)
    wiring = Processes()
    run = run_real(digits_bundle, pair, 20.0, x[:81], 10.0, POINT, tmp_path, wiring)
    measured = asyncio.run(run)
    simulated = predict(calibrated, measured, pair, 20.0, POINT)
    real_p50, sim_p50 = np.median(measured.latency_ms), np.median(simulated)
    print(f"p50 real {real_p50:.1f} ms, simulated {sim_p50:.1f} ms")
    assert len(simulated) == len(measured.latency_ms) == 80
    assert real_p50 > 40, "two 20 ms one-way delays at least"
    assert abs(sim_p50 - real_p50) <= 0.15 * real_p50
