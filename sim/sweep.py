"""Sweeps: a scenario run once per value of one parameter, every strategy at each value.

``bandwidth`` makes every device's uplink a constant rate (Mbit/s); ``devices`` sets every
group's device count; ``bits`` and ``width`` move the fixed split point (the other strategies
then serve as reference lines).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tandem.sim.charts import plot_sweep
from tandem.sim.report import (
    Progress,
    aligned_text,
    markdown_table,
    run_strategies,
    summarise_runs,
    table_rows,
)
from tandem.sim.scenario import Scenario, build, parse_scenario

PARAMS = {
    "bandwidth": "uplink (Mbit/s)",
    "devices": "devices per group",
    "bits": "split bits",
    "width": "split width",
}
INTEGER_PARAMS = ("devices", "bits")


def parse_values(param: str, text: str) -> list[float]:
    """``--values``: comma-separated positive numbers (whole numbers for devices and bits)."""
    if param not in PARAMS:
        raise ValueError(f"--param: unknown parameter {param!r}; choose from {list(PARAMS)}")
    cast = int if param in INTEGER_PARAMS else float
    try:
        values: list[float] = [cast(v) for v in text.split(",")]
    except ValueError:
        kind = "whole numbers" if cast is int else "numbers"
        raise ValueError(f"--values: expected comma-separated {kind}, got {text!r}") from None
    if not all(0 < v < float("inf") for v in values):
        raise ValueError(f"--values: every value must be positive and finite, got {text!r}")
    return values


def vary(scenario: Scenario, param: str, value: float) -> Scenario:
    """``scenario`` with ``param`` set to ``value``, validated again."""
    data = scenario.model_dump(by_alias=True)
    if param == "bandwidth":
        for group in data["devices"]:
            group["uplink"] = f"const:{float(value)!r}"
    elif param == "devices":
        for group in data["devices"]:
            group["count"] = value
    elif param in ("bits", "width"):
        if data["split"] is None or "split" not in scenario.strategies:
            raise ValueError(f"--param {param} moves the split point: the scenario has no split")
        data["split"][param] = value
        if param == "bits":  # bits name a quantise+zstd row, not a rate point
            data["split"]["point"] = None
    else:
        raise ValueError(f"--param: unknown parameter {param!r}; choose from {list(PARAMS)}")
    return parse_scenario(data, f"{scenario.name} with {param} {value:g}")


def run_sweep(
    scenario: Scenario,
    base: Path,
    param: str,
    values: Sequence[float],
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Each strategy's summary at each value; relative paths are relative to ``base``."""
    points, wall = [], 0.0
    for value in values:
        setup = build(vary(scenario, param, value), base)
        runs = run_strategies(setup, progress=progress)
        wall += sum(r.wall_s for r in runs)
        points.append({"value": value, "strategies": summarise_runs(setup, runs)})
    return {
        "scenario": scenario.model_dump(by_alias=True),
        "param": param,
        "label": PARAMS[param],
        "values": list(values),
        "points": points,
        "wall_s": wall,
        "files": ["sweep.json", "sweep.md", "sweep.png"],
    }


def sweep_rows(doc: dict[str, Any]) -> list[list[str]]:
    """A header, then a row per (value, strategy) with the report's columns."""
    header: list[str] = []
    rows: list[list[str]] = []
    for point in doc["points"]:
        header, *body = table_rows(point["strategies"])
        rows += [[f"{point['value']:g}", *row] for row in body]
    return [[doc["param"], *header], *rows]


def sweep_text(doc: dict[str, Any]) -> str:
    """The sweep as aligned plain text."""
    return aligned_text(sweep_rows(doc), text_columns=2)


def write_sweep(doc: dict[str, Any], out: Path) -> None:
    """``out/sweep.json``, ``out/sweep.md`` and ``out/sweep.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    plot_sweep(doc, out / "sweep.png")
    s = doc["scenario"]
    (out / "sweep.md").write_text(
        f"# Sweep of `{s['name']}` over {doc['label']}\n\n"
        f"Values {', '.join(f'{v:g}' for v in doc['values'])}; everything else as in the "
        f"scenario ({s['duration_s']:g} s simulated per point, SLO {s['slo_ms']:g} ms).\n\n"
        "![p50 latency and deadline misses](sweep.png)\n\n"
        + markdown_table(sweep_rows(doc), text_columns=2)
        + "\n"
    )
