"""Reports: summary figures on hand-computable cases, and the files a report writes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandem.sim.des import Outcome
from tandem.sim.profiles import DEVICE_CLASSES
from tandem.sim.report import CHARTS, run_strategies, summarise, text_table, write_report
from tandem.sim.scenario import Setup, build, parse_scenario

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _setup(strategies: list[str], slo_ms: float = 100.0, duration_s: float = 5.0) -> Setup:
    data: dict[str, Any] = {
        "name": "tiny",
        "profile": "mnist-host",
        "devices": [{"count": 2, "class": "host", "uplink": "const:5", "downlink": "const:10"}],
        "strategies": strategies,
        "split": {"width": 0.25, "bits": 4},
        "slo_ms": slo_ms,
        "duration_s": duration_s,
    }
    return build(parse_scenario(data), Path("."))


def _outcome(latency_ms: list[float], busy_s: float, workers: int) -> Outcome:
    n = len(latency_ms)
    return Outcome(
        device=np.zeros(n, int),
        arrival_s=np.arange(n, dtype=float),
        latency_s=np.array(latency_ms) / 1000,
        up_bytes=np.array([100.0, 200.0, 0.0, 300.0]),
        down_bytes=np.array([64.0, 64.0, 0.0, 64.0]),
        local=np.array([False, False, True, False]),
        energy_j=np.array([0.001, 0.002, 0.003, 0.006]),
        accuracy=np.array([0.9, 0.9, 1.0, 1.0]),
        cloud_busy_s=busy_s,
        duration_s=10.0,
        workers=workers,
        cloud_done_s=np.full(n, np.nan),
        rounds=3,
        converged=False,
    )


def test_local_strategy_latency_is_the_devices_full_model_time() -> None:
    setup = _setup(["local"])
    (run,) = run_strategies(setup)
    s = summarise(run.outcome, setup.scenario.slo_ms, run.wall_s)
    full_ms = setup.profile.full_ms  # host class: the profiled time, unscaled
    assert s["requests"] == 2 * 5 * 10  # two devices, 5 s at 10 fps
    assert s["latency_ms"] == pytest.approx({"p50": full_ms, "p95": full_ms, "p99": full_ms})
    assert s["deadline_miss_rate"] == 0.0
    assert s["energy_mj_per_inference"] == pytest.approx(full_ms * DEVICE_CLASSES["host"].compute_w)
    assert (s["up_bytes_per_inference"], s["down_bytes_per_inference"]) == (0.0, 0.0)
    assert (s["cloud_utilisation"], s["local_fraction"]) == (0.0, 1.0)
    assert s["accuracy"] == pytest.approx(setup.profile.full_accuracy)
    assert s["wall_s"] == run.wall_s and s["requests_per_s"] == pytest.approx(100 / run.wall_s)
    assert "rounds" not in s


def test_every_input_misses_a_deadline_below_the_full_model_time() -> None:
    setup = _setup(["local"], slo_ms=1.0)
    assert setup.profile.full_ms > 1.0
    (run,) = run_strategies(setup)
    assert summarise(run.outcome, 1.0, run.wall_s)["deadline_miss_rate"] == 1.0


def test_summary_figures_of_a_constructed_outcome() -> None:
    outcome = _outcome([10.0, 20.0, 50.0, 200.0], busy_s=3.0, workers=2)
    s = summarise(outcome, slo_ms=40.0, wall_s=0.5, adaptive=True)
    assert s["requests"] == 4
    # numpy's linear interpolation between order statistics
    assert s["latency_ms"] == pytest.approx({"p50": 35.0, "p95": 177.5, "p99": 195.5})
    assert s["deadline_miss_rate"] == 0.5
    assert s["up_bytes_per_inference"] == 150.0
    assert s["down_bytes_per_inference"] == 48.0
    assert s["energy_mj_per_inference"] == pytest.approx(3.0)
    assert s["cloud_utilisation"] == pytest.approx(3.0 / (10.0 * 2))
    assert s["accuracy"] == pytest.approx(0.95)
    assert s["local_fraction"] == 0.25
    assert s["requests_per_s"] == 8.0
    assert (s["rounds"], s["converged"]) == (3, False)


def test_no_requests_gives_no_figures_rather_than_nan() -> None:
    none = np.zeros(0)
    empty = Outcome(
        device=none, arrival_s=none, latency_s=none, up_bytes=none, down_bytes=none,
        local=none, energy_j=none, accuracy=none, cloud_busy_s=0.0, duration_s=1.0, workers=1,
        cloud_done_s=none,
    )  # fmt: skip
    s = summarise(empty, 100.0, 0.1)
    assert s["requests"] == 0
    assert s["latency_ms"] == {"p50": None, "p95": None, "p99": None}
    assert s["deadline_miss_rate"] is None and s["accuracy"] is None
    json.dumps(s, allow_nan=False)


def test_remote_strategies_send_the_profiles_bytes_and_get_answers_back() -> None:
    setup = _setup(["offload-raw", "offload-png", "split"])
    figures = {r.name: summarise(r.outcome, 100.0, r.wall_s) for r in run_strategies(setup)}
    p = setup.profile
    split_row = next(r for r in p.table if r.width == 0.25 and r.bits == 4)
    expected = {
        "offload-raw": p.input_bytes,
        "offload-png": p.png_bytes,
        "split": split_row.bytes_per_sample,
    }
    for name, payload in expected.items():
        s = figures[name]
        assert s["up_bytes_per_inference"] == pytest.approx(payload + p.wire_overhead_bytes())
        assert s["down_bytes_per_inference"] == pytest.approx(p.answer_bytes())
        assert s["local_fraction"] == 0.0
        assert 0 < s["cloud_utilisation"] < 0.1
        # 20 ms each way plus serialising and the cloud: above 40 ms, far below the SLO
        assert 40.0 < s["latency_ms"]["p50"] < 60.0
        assert s["deadline_miss_rate"] == 0.0


def test_write_report_writes_the_markdown_the_summary_and_real_pngs(tmp_path: Path) -> None:
    setup = _setup(["local", "split", "adaptive"], duration_s=2.0)
    out = tmp_path / "report"
    ticks: list[int] = []
    doc = write_report(setup, out, uplink_mbps=(0.5, 5.0), progress=ticks.append)
    assert len(ticks) == 3 * 3  # the scenario, then two uplink rates, each for 3 strategies
    assert json.loads((out / "summary.json").read_text()) == doc
    assert list(doc["strategies"]) == ["local", "split", "adaptive"]
    assert doc["requests"] == 3 * 2 * 2 * 10
    assert doc["strategies"]["adaptive"]["converged"] in (True, False)
    curve = doc["uplink_curve"]
    assert curve["mbps"] == [0.5, 5.0] and curve["duration_s"] == 2.0
    split = curve["p50_ms"]["split"]
    assert len(split) == 2 and split[0] > split[1]  # slower uplink, slower answers
    assert curve["p50_ms"]["local"][0] == pytest.approx(curve["p50_ms"]["local"][1])
    for name in CHARTS.values():
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
    report = (out / "report.md").read_text()
    for name in CHARTS.values():
        assert f"]({name})" in report
    assert "# Scenario `tiny`" in report
    assert "| split |" in report and "| adaptive |" in report
    assert DEVICE_CLASSES["host"].basis[1:] in report
    assert sorted(p.name for p in out.iterdir()) == sorted(doc["files"])


def test_text_table_has_a_row_per_strategy() -> None:
    setup = _setup(["local", "offload-png"], duration_s=1.0)
    runs = run_strategies(setup)
    table = text_table({r.name: summarise(r.outcome, 100.0, r.wall_s) for r in runs})
    header, *rows = table.splitlines()
    assert header.split()[:5] == ["strategy", "requests", "p50", "ms", "p95"]
    assert [row.split()[0] for row in rows] == ["local", "offload-png"]
    assert rows[0].split()[1] == "20"


def test_answers_cost_the_bytes_calibration_counted_at_the_socket() -> None:
    """A calibrated profile's ``response_bytes`` is what each simulated answer carries down."""
    setup = _setup(["split"])
    calibrated = replace(setup, profile=setup.profile.model_copy(update={"response_bytes": 111.0}))
    (run,) = run_strategies(calibrated)
    assert summarise(run.outcome, 100.0, run.wall_s)["down_bytes_per_inference"] == 111.0
