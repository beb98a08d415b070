"""The demo's link: the shared LTE trace when it is there, a synthetic one otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.sim import demo
from tandem.sim.traces import parse_spec


def test_without_the_shared_traces_the_link_is_synthetic(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(demo, "SHARED_LTE", tmp_path / "nowhere")
    up, down, name = demo.link_specs()
    assert "synthetic" in name
    assert 2 < parse_spec(up).mean_mbps < 8  # an LTE-like uplink
    assert parse_spec(down).mean_mbps > parse_spec(up).mean_mbps


def test_with_the_shared_traces_the_link_is_a_real_lte_trace() -> None:
    if not (demo.SHARED_LTE / f"{demo.LTE_TRACE}.up").exists():
        pytest.skip("../shared/traces is not here")
    up, down, name = demo.link_specs()
    assert up.endswith(".up") and down.endswith(".down") and demo.LTE_TRACE in name
    assert parse_spec(up).mean_mbps == pytest.approx(6.0, abs=0.1)
