"""Sweeps: parsing values, varying one parameter of a scenario, and the files written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tandem.sim.scenario import Scenario, build, parse_scenario
from tandem.sim.sweep import parse_values, run_sweep, vary, write_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scenario(strategies: list[str] | None = None) -> Scenario:
    data: dict[str, Any] = {
        "name": "tiny",
        "profile": "mnist-host",
        "devices": [
            {"count": 1, "class": "host", "uplink": "walk:3,1@0.5", "downlink": "const:10"},
            {"count": 2, "class": "rpi4", "uplink": "const:1", "downlink": "const:10"},
        ],
        "strategies": strategies or ["local", "split"],
        "split": {"width": 0.25, "bits": 4},
        "duration_s": 2,
    }
    return parse_scenario(data)


@pytest.mark.parametrize(
    ("param", "text", "expected"),
    [
        ("bandwidth", "0.5,2,10", [0.5, 2.0, 10.0]),
        ("devices", "1,4", [1, 4]),
        ("bits", "2,8", [2, 8]),
        ("width", "0.25,1", [0.25, 1.0]),
    ],
)
def test_parse_values(param: str, text: str, expected: list[float]) -> None:
    values = parse_values(param, text)
    assert values == expected
    assert all(isinstance(v, int) for v in values) == (param in ("devices", "bits"))


@pytest.mark.parametrize(
    ("param", "text", "expected"),
    [
        ("devices", "1,2.5", "--values: expected comma-separated whole numbers"),
        ("bandwidth", "1,,2", "--values: expected comma-separated numbers"),
        ("bandwidth", "0,1", "--values: every value must be positive"),
        ("width", "inf", "--values: every value must be positive and finite"),
        ("latency", "1", "--param: unknown parameter 'latency'"),
    ],
)
def test_parse_values_rejects(param: str, text: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        parse_values(param, text)


def test_vary_sets_one_parameter_and_keeps_the_rest() -> None:
    s = _scenario()
    fast = vary(s, "bandwidth", 7.5)
    assert [g.uplink for g in fast.devices] == ["const:7.5", "const:7.5"]
    assert [g.downlink for g in fast.devices] == ["const:10", "const:10"]
    assert [g.count for g in vary(s, "devices", 5).devices] == [5, 5]
    bits = vary(s, "bits", 2).split
    assert bits is not None and (bits.width, bits.bits) == (0.25, 2)
    wider = vary(s, "width", 0.5)
    assert wider.split is not None and (wider.split.width, wider.split.bits) == (0.5, 4)
    assert wider.devices == s.devices
    assert s.split is not None and s.split.width == 0.25  # the original is untouched


def test_vary_checks_what_it_changes() -> None:
    with pytest.raises(ValueError, match="the scenario has no split"):
        vary(_scenario(["local", "adaptive"]), "bits", 2)
    with pytest.raises(ValueError, match=r"tiny with width 1.5: split.width: Input should be"):
        vary(_scenario(), "width", 1.5)


def test_run_sweep_writes_json_markdown_and_a_png(tmp_path: Path) -> None:
    ticks: list[int] = []
    doc = run_sweep(_scenario(), Path("."), "bits", [2, 8], progress=ticks.append)
    assert len(ticks) == 2 * 2
    assert doc["param"] == "bits" and doc["values"] == [2, 8]
    low, high = (p["strategies"]["split"] for p in doc["points"])
    assert low["up_bytes_per_inference"] < high["up_bytes_per_inference"]
    assert low["accuracy"] < high["accuracy"]
    local = [p["strategies"]["local"]["latency_ms"]["p50"] for p in doc["points"]]
    assert local[0] == local[1]  # the split point does not touch local inference
    write_sweep(doc, tmp_path)
    assert json.loads((tmp_path / "sweep.json").read_text()) == doc
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG_MAGIC)
    md = (tmp_path / "sweep.md").read_text()
    assert "](sweep.png)" in md and "| 2 | split |" in md and "| 8 | local |" in md


def test_a_devices_sweep_grows_the_fleet() -> None:
    s = _scenario(["offload-png"])
    doc = run_sweep(s, Path("."), "devices", [1, 3])
    requests = [p["strategies"]["offload-png"]["requests"] for p in doc["points"]]
    assert requests == [2 * 2 * 10, 6 * 2 * 10]  # two groups, 2 s at 10 fps
    assert len(build(vary(s, "devices", 3), Path(".")).devices) == 6
