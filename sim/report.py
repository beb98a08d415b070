"""What a scenario costs per strategy: summary figures, charts and a markdown report.

:func:`write_report` runs every strategy of a scenario, then again on constant uplinks over a
range of bandwidths (the classic split-computing chart: where offloading, splitting and local
inference cross over), and writes ``report.md``, ``summary.json`` and the charts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tandem.sim.charts import plot_bytes, plot_cdf, plot_uplink
from tandem.sim.des import Outcome, simulate
from tandem.sim.profiles import DEVICE_CLASSES
from tandem.sim.scenario import Setup
from tandem.sim.traces import constant

Progress = Callable[[int], object]
UPLINK_MBPS = tuple(float(v) for v in np.geomspace(0.1, 50, 8))
CHART_DURATION_S = 20.0  # enough inputs per point for a stable median, quick to re-run
CHARTS = {
    "uplink": "latency_vs_uplink.png",
    "cdf": "latency_cdf.png",
    "bytes": "bytes_up.png",
}


@dataclass(frozen=True)
class Run:
    """One strategy's simulation and how long the simulator took over it."""

    name: str
    outcome: Outcome
    wall_s: float


def run_strategies(
    setup: Setup,
    duration_s: float | None = None,
    uplink_mbps: float | None = None,
    progress: Progress | None = None,
) -> list[Run]:
    """Simulate each of the scenario's strategies; ``uplink_mbps`` replaces every device's
    uplink with a constant one, ``duration_s`` the scenario's duration."""
    duration = setup.scenario.duration_s if duration_s is None else duration_s
    devices = setup.devices
    if uplink_mbps is not None:
        up = constant(uplink_mbps)
        devices = [replace(d, up=up) for d in devices]
    answers = setup.profile.answer_bytes()
    runs = []
    for name, strategy in setup.strategies.items():
        start = time.perf_counter()
        outcome = simulate(devices, setup.cloud, strategy, duration, response_bytes=answers)
        runs.append(Run(name, outcome, time.perf_counter() - start))
        if progress is not None:
            progress(1)
    return runs


def summarise(
    outcome: Outcome, slo_ms: float, wall_s: float, adaptive: bool = False
) -> dict[str, Any]:
    """One strategy's figures; a figure over no requests is None. ``adaptive`` adds how many
    decision/cloud rounds the simulator took and whether they settled."""
    n = len(outcome.latency_s)
    latency_ms = outcome.latency_s * 1000
    quantiles = (50, 95, 99)
    values = np.percentile(latency_ms, quantiles).tolist() if n else [None] * len(quantiles)
    doc: dict[str, Any] = {
        "requests": n,
        "latency_ms": {f"p{q}": v for q, v in zip(quantiles, values, strict=True)},
        "deadline_miss_rate": _mean(latency_ms > slo_ms),
        "up_bytes_per_inference": _mean(outcome.up_bytes),
        "down_bytes_per_inference": _mean(outcome.down_bytes),
        "energy_mj_per_inference": _mean(outcome.energy_j * 1000),
        "cloud_utilisation": outcome.cloud_busy_s / (outcome.duration_s * outcome.workers),
        "accuracy": _mean(outcome.accuracy),
        "local_fraction": _mean(outcome.local),
        "wall_s": wall_s,
        "requests_per_s": n / wall_s if wall_s > 0 else None,
    }
    if adaptive:
        doc.update(rounds=outcome.rounds, converged=outcome.converged)
    return doc


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def summarise_runs(setup: Setup, runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """:func:`summarise` for each run, by strategy name."""
    slo = setup.scenario.slo_ms
    return {
        r.name: summarise(r.outcome, slo, r.wall_s, setup.strategies[r.name].kind == "adaptive")
        for r in runs
    }


def summary(setup: Setup, runs: Sequence[Run]) -> dict[str, Any]:
    """The whole scenario's summary: its settings, each strategy's figures, simulator speed."""
    scenario = setup.scenario
    wall = sum(r.wall_s for r in runs)
    requests = sum(len(r.outcome.latency_s) for r in runs)
    return {
        "scenario": scenario.model_dump(by_alias=True),
        "profile": {
            "bundle": setup.profile.bundle,
            "version": setup.profile.version,
            "machine": setup.profile.machine,
        },
        "devices": len(setup.devices),
        "strategies": summarise_runs(setup, runs),
        "requests": requests,
        "wall_s": wall,
        "requests_per_s": requests / wall if wall > 0 else None,
    }


def uplink_curve(
    setup: Setup, mbps: Sequence[float], progress: Progress | None = None
) -> dict[str, Any]:
    """p50 latency per strategy with every uplink a constant ``mbps[i]`` Mbit/s."""
    duration = min(setup.scenario.duration_s, CHART_DURATION_S)
    p50: dict[str, list[float | None]] = {name: [] for name in setup.strategies}
    for rate in mbps:
        for run in run_strategies(setup, duration, uplink_mbps=rate, progress=progress):
            latency = run.outcome.latency_s
            p50[run.name].append(float(np.median(latency)) * 1000 if len(latency) else None)
    return {"mbps": list(mbps), "duration_s": duration, "p50_ms": p50}


_LOSSLESS = {"offload-raw", "offload-png"}


def split_rivals(
    curve: dict[str, Any], accuracy: Mapping[str, float] | None = None
) -> tuple[list[str], list[str]]:
    """The strategies of ``curve`` the split is compared with, and the offloads left out.

    Rivals are local inference and every offload strategy, except (when ``accuracy`` gives
    strategy accuracies) a lossy offload known to be less accurate than the split: a smaller
    input codec that loses accuracy is a different product, not a faster way to the split's
    answers. Lossless offloads (raw, PNG) run the whole model, and an accuracy of 0 means
    unknown: those always stay rivals.
    """
    accuracy = accuracy or {}
    mine = accuracy.get("split", 0.0)
    rivals: list[str] = []
    left_out: list[str] = []
    for name in curve["p50_ms"]:
        if name == "local" or name.startswith("offload-"):
            theirs = accuracy.get(name, 0.0)
            worse = name not in _LOSSLESS and 0 < theirs < mine
            (left_out if worse else rivals).append(name)
    return rivals, left_out


def split_wins(
    curve: dict[str, Any], accuracy: Mapping[str, float] | None = None
) -> list[float] | None:
    """The uplink rates of ``curve`` at which the fixed split's p50 is below that of every
    rival (:func:`split_rivals`); None when split, or every rival, did not run."""
    p50 = curve["p50_ms"]
    rivals, _ = split_rivals(curve, accuracy)
    if "split" not in p50 or not rivals:
        return None
    wins = []
    for i, rate in enumerate(curve["mbps"]):
        mine = p50["split"][i]
        others = [p50[name][i] for name in rivals]
        if mine is not None and all(o is None or mine < o for o in others):
            wins.append(rate)
    return wins


def _wins_line(doc: dict[str, Any]) -> list[str]:
    wins = doc.get("split_wins_mbps")
    rivals = doc.get("split_rivals", {})
    compared = ", ".join(rivals.get("compared", [])) or "local inference and offloading"
    left_out = rivals.get("less_accurate", [])
    note = (
        [f"Left out of the comparison, as less accurate than the split: "
         f"{', '.join(left_out)} (see the table's accuracy column).", ""]
        if left_out else []
    )  # fmt: skip
    if wins is None:
        return note
    if not wins:
        return [f"At no uplink rate of the chart does the split beat {compared} at p50.", "",
                *note]  # fmt: skip
    rates = ", ".join(f"{w:.3g}" for w in wins)
    return [f"The split beats {compared} at p50 at {rates} Mbit/s of the chart's rates.", "",
            *note]  # fmt: skip


def report_steps(setup: Setup, uplink_mbps: Sequence[float] = UPLINK_MBPS) -> int:
    """How many simulations :func:`write_report` runs (for a progress bar)."""
    return len(setup.strategies) * (1 + len(uplink_mbps))


def write_report(
    setup: Setup,
    out: Path,
    uplink_mbps: Sequence[float] = UPLINK_MBPS,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the scenario and the uplink chart's points; write ``out/report.md``,
    ``out/summary.json`` and the charts; return the summary written."""
    runs = run_strategies(setup, progress=progress)
    doc = summary(setup, runs)
    doc["uplink_curve"] = uplink_curve(setup, uplink_mbps, progress)
    accuracy = {name: s.accuracy for name, s in setup.strategies.items()}
    doc["split_wins_mbps"] = split_wins(doc["uplink_curve"], accuracy)
    compared, left_out = split_rivals(doc["uplink_curve"], accuracy)
    doc["split_rivals"] = {"compared": compared, "less_accurate": left_out}
    doc["files"] = ["report.md", "summary.json", *CHARTS.values()]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slo = setup.scenario.slo_ms
    plot_uplink(doc["uplink_curve"], slo, out / CHARTS["uplink"])
    plot_cdf(runs, slo, out / CHARTS["cdf"])
    plot_bytes(doc["strategies"], out / CHARTS["bytes"])
    (out / "summary.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    (out / "report.md").write_text(markdown(setup, doc))
    return doc


# ------------------------------------------------------------------------------- tables

COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("requests", lambda s: str(s["requests"])),
    ("p50 ms", lambda s: _fmt(s["latency_ms"]["p50"], ".1f")),
    ("p95 ms", lambda s: _fmt(s["latency_ms"]["p95"], ".1f")),
    ("p99 ms", lambda s: _fmt(s["latency_ms"]["p99"], ".1f")),
    ("miss %", lambda s: _fmt(s["deadline_miss_rate"], ".1f", 100)),
    ("up B", lambda s: _fmt(s["up_bytes_per_inference"], ".0f")),
    ("down B", lambda s: _fmt(s["down_bytes_per_inference"], ".0f")),
    ("mJ/inf", lambda s: _fmt(s["energy_mj_per_inference"], ".2f")),
    ("cloud %", lambda s: _fmt(s["cloud_utilisation"], ".1f", 100)),
    ("acc %", lambda s: _fmt(s["accuracy"], ".2f", 100)),
    ("local %", lambda s: _fmt(s["local_fraction"], ".0f", 100)),
)


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def table_rows(strategies: dict[str, dict[str, Any]]) -> list[list[str]]:
    """A header row, then one row of formatted figures per strategy."""
    rows = [["strategy", *(header for header, _ in COLUMNS)]]
    rows += [[name, *(cell(s) for _, cell in COLUMNS)] for name, s in strategies.items()]
    return rows


def text_table(strategies: dict[str, dict[str, Any]]) -> str:
    """The strategies' figures as aligned plain text."""
    return aligned_text(table_rows(strategies))


def aligned_text(rows: list[list[str]], text_columns: int = 1) -> str:
    """Rows as plain-text columns: the first ``text_columns`` left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < text_columns else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def speed_line(doc: dict[str, Any]) -> str:
    """How fast the simulator went over a summary's runs."""
    rate = _fmt(doc["requests_per_s"], ",.0f")
    return f"{doc['requests']} requests simulated in {doc['wall_s']:.2f} s ({rate} requests/s)"


def markdown_table(rows: list[list[str]], text_columns: int = 1) -> str:
    """Rows (the first a header) as a markdown table: the first ``text_columns`` columns
    left-aligned, the numbers after them right-aligned."""
    align = ["---"] * text_columns + ["---:"] * (len(rows[0]) - text_columns)
    return "\n".join("| " + " | ".join(row) + " |" for row in [rows[0], align, *rows[1:]])


def markdown(setup: Setup, doc: dict[str, Any]) -> str:
    """The report: the scenario, the figures, the charts and the device classes' basis."""
    s = setup.scenario
    cloud = s.cloud
    groups = [["class", "uplink", "downlink", "arrivals", "devices", "delay ms", "fps"]]
    groups += [
        [g.device_class, f"`{g.uplink}`", f"`{g.downlink}`", g.arrivals, str(g.count),
         f"{g.delay_ms:g}", f"{g.fps:g}"]
        for g in s.devices
    ]  # fmt: skip
    split = f"; split at {s.split.describe()}" if s.split else ""
    curve = doc["uplink_curve"]
    lines = [
        f"# Scenario `{s.name}`",
        "",
        f"{doc['devices']} devices for {s.duration_s:g} s of simulated time, SLO {s.slo_ms:g} ms, "
        f"seed {s.seed}. Costs: {s.source()}: {setup.profile.bundle} "
        f"v{setup.profile.version}, measured on {setup.profile.machine}. Cloud: "
        f"{cloud.workers} worker(s), batches of up to {cloud.max_batch}, "
        f"{cloud.max_delay_ms:g} ms batching delay{split}.",
        "",
        markdown_table(groups, text_columns=4),
        "",
        "## Results",
        "",
        markdown_table(table_rows(doc["strategies"])),
        "",
        f"Latency is arrival to answer on the device; a miss is latency over {s.slo_ms:g} ms. "
        "Bytes include the request's protobuf envelope and the HTTP/2 and gRPC framing a "
        "calibrated profile measured; energy is the device's compute and "
        "radio airtime at the trace's mean rate.",
        "",
        *_convergence(doc["strategies"]),
        f"Simulator speed: {speed_line(doc)}.",
        "",
        f"![p50 latency vs uplink bandwidth]({CHARTS['uplink']})",
        "",
        f"p50 latency with every uplink a constant rate ({curve['duration_s']:g} s per point; "
        "the other settings as above).",
        "",
        *_wins_line(doc),
        f"![latency CDF]({CHARTS['cdf']})",
        "",
        f"![bytes up per inference]({CHARTS['bytes']})",
        "",
        "## Device classes",
        "",
        *_class_notes(sorted({g.device_class for g in s.devices})),
        *(["", "## Stated figures", "", *(f"- {line}" for line in s.model.sources())]
          if s.model is not None else []),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _convergence(strategies: dict[str, dict[str, Any]]) -> list[str]:
    """A paragraph on whether the adaptive strategy's decisions settled, if it ran."""
    notes = [
        f"`{name}` settled after {s['rounds']} rounds."
        if s["converged"]
        else f"`{name}` had not settled after {s['rounds']} rounds (figures are the last)."
        for name, s in strategies.items()
        if "rounds" in s
    ]
    return [" ".join(notes), ""] if notes else []


def _class_notes(names: list[str]) -> list[str]:
    notes = []
    for name in names:
        c = DEVICE_CLASSES[name]
        notes.append(
            f"- **{name}**: compute time {c.factor:g}x the profiled machine's, "
            f"{c.compute_w:g} W computing, {c.tx_w:g} W sending, {c.rx_w:g} W receiving. "
            f"{c.basis[:1].upper()}{c.basis[1:].rstrip('.')}."
        )
    return notes
