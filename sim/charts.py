"""The simulator's charts, drawn with matplotlib to PNG files (no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tandem.sim.report import Run


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported late:
    it is slow to import and only reports need it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_uplink(curve: dict[str, Any], slo_ms: float, path: Path) -> None:
    """p50 latency against constant uplink bandwidth, one line per strategy."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, p50 in curve["p50_ms"].items():
        ys = [np.nan if v is None else v for v in p50]
        ax.plot(curve["mbps"], ys, marker="o", label=name)
    ax.axhline(slo_ms, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo_ms:g} ms")
    ax.set(xscale="log", yscale="log", xlabel="uplink (Mbit/s)", ylabel="p50 latency (ms)")
    ax.set_title("p50 latency vs uplink bandwidth")
    save(plt, fig, ax, path)


def plot_cdf(runs: Sequence[Run], slo_ms: float, path: Path) -> None:
    """The empirical latency distribution of each strategy."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        ms = np.sort(run.outcome.latency_s) * 1000
        if len(ms):
            ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post", label=run.name)
    ax.axvline(slo_ms, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo_ms:g} ms")
    ax.set(xscale="log", xlabel="latency (ms)", ylabel="fraction of requests", ylim=(0, 1.01))
    ax.set_title("Latency CDF")
    save(plt, fig, ax, path)


def plot_bytes(strategies: dict[str, dict[str, Any]], path: Path) -> None:
    """Mean bytes sent up per inference, a bar per strategy."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(strategies)
    values = [strategies[n]["up_bytes_per_inference"] or 0.0 for n in names]
    bars = ax.bar(names, values, color="tab:blue")
    ax.bar_label(bars, fmt="%.0f")
    ax.set(ylabel="bytes up per inference")
    ax.set_title("Uplink bytes per inference")
    save(plt, fig, None, path)


def save(plt: Any, fig: Any, legend_ax: Any, path: Path, below: bool = False) -> None:
    """Write ``fig`` to ``path`` and close it; with ``legend_ax``, draw its legend (inside
    the axes, or under them when ``below``: a long legend there covers no point) and grid."""
    # Laid out before the legend, so a legend under the axes does not squeeze them.
    fig.tight_layout()
    if legend_ax is not None:
        if below:
            # Under everything the axes draw (tick labels, the axis label), whatever the size.
            bottom = legend_ax.get_tightbbox(fig.canvas.get_renderer()).y0
            y = legend_ax.transAxes.inverted().transform((0, bottom))[1]
            legend_ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, y - 0.02))
        else:
            legend_ax.legend(fontsize="small")
        legend_ax.grid(True, which="major", alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_sweep(doc: dict[str, Any], path: Path) -> None:
    """p50 latency and deadline-miss rate against the parameter, a line per strategy."""
    plt = pyplot()
    fig, (lat, miss) = plt.subplots(1, 2, figsize=(11, 4.5))
    values = doc["values"]
    for name in doc["points"][0]["strategies"]:
        series = [p["strategies"][name] for p in doc["points"]]
        p50 = [s["latency_ms"]["p50"] for s in series]
        rate = [s["deadline_miss_rate"] for s in series]
        lat.plot(values, [float("nan") if v is None else v for v in p50], marker="o", label=name)
        miss.plot(values, [float("nan") if v is None else v for v in rate], marker="o")
    slo = doc["scenario"]["slo_ms"]
    lat.axhline(slo, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo:g} ms")
    lat.set(yscale="log", ylabel="p50 latency (ms)", title="p50 latency")
    miss.set(ylabel=f"fraction over {slo:g} ms", ylim=(-0.02, 1.02), title="Deadline misses")
    for ax in (lat, miss):
        ax.set(xlabel=doc["label"], xscale="log" if doc["param"] == "bandwidth" else "linear")
        ax.grid(True, alpha=0.3)
    lat.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


_BASELINE_NAMES = {"png": "PNG", "zstd19": "zstd-19", "webp_lossless": "WebP lossless"}
_INPUT_NAMES = {"jpeg": "JPEG", "webp": "WebP"}


def _mark_equal_accuracy(ax: Any, compared: dict[str, Any] | None) -> None:
    """The line ``within`` below the teacher, and a star on the cheapest point of each route
    above it (:mod:`tandem.equal_accuracy`)."""
    if compared is None:
        return
    pp = 100 * compared["within"]
    ax.axhline(100 * compared["teacher_accuracy"] - pp, color="black", linewidth=0.8,
               linestyle=":", label=f"{pp:g} pp below the teacher")  # fmt: skip
    for route, colour in (("input", "tab:brown"), ("bottleneck", "tab:blue")):
        point = compared[route]
        if point is not None:
            size = point["bytes_per_sample"]
            ax.plot([size], [100 * point["accuracy"]], "*", color=colour, markersize=13,
                    markeredgecolor="black", linestyle="none",
                    label=f"cheapest {route} within {pp:g} pp ({size:.0f} B)")  # fmt: skip


def plot_rate_accuracy(report: dict[str, Any], path: Path) -> None:
    """A ``tandem eval`` report as a rate-accuracy chart: bytes per sample (log axis) against
    accuracy, one line per codec of the bottleneck (each rate point, each bit depth) across
    its widths, the teacher as a line, the lossless input codecs as marks at its accuracy
    (sending the input loses nothing), and the teacher on JPEG and WebP inputs as dotted
    curves over their qualities."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict[str, list[tuple[float, float]]] = {}
    # One width: its rate points are one curve; several: each rate point across the widths.
    one_width = len({p["width"] for p in report["points"]}) == 1
    betas = sorted({p["beta"] for p in report["points"] if p.get("codec") == "entropy"})
    for p in report["points"]:
        if p.get("codec") != "entropy":
            name = f"{p['bits']}-bit + zstd"
        elif one_width:
            name = f"entropy-coded, β={betas[0]:g} to {betas[-1]:g}"
        else:
            name = f"entropy-coded, β={p['beta']:g}"
        series.setdefault(name, []).append((p["bytes_per_sample"], 100 * p["accuracy"]))
    for name, xy in series.items():
        xs, ys = zip(*sorted(xy), strict=True)
        style = "-o" if name.startswith("entropy") else "--s"
        ax.plot(xs, ys, style, markersize=4, label=name)
    teacher = report["teacher"]["accuracy"]
    if teacher is not None:
        ax.axhline(100 * teacher, color="black", linewidth=1, label="teacher")
        for (key, label), marker in zip(_BASELINE_NAMES.items(), "^vD", strict=True):
            if key in report["baselines"]:
                x = report["baselines"][key]
                ax.plot([x], [100 * teacher], marker, color="black", markersize=7,
                        linestyle="none", label=f"input as {label} ({x:.0f} B)")  # fmt: skip
    # The axis follows the bottleneck's points: an input codec's collapse at its lowest
    # qualities would otherwise flatten them. A point below it is named in the legend.
    floor = min(100 * p["accuracy"] for p in report["points"]) - 1.0
    for codec, style in (("jpeg", ":x"), ("webp", ":+")):
        rows = sorted((r for r in report.get("input_codecs", []) if r["codec"] == codec),
                      key=lambda r: r["bytes_per_sample"])  # fmt: skip
        if not rows:
            continue
        below = [f"q{r['quality']} {100 * r['accuracy']:.1f}%" for r in rows
                 if 100 * r["accuracy"] < floor]  # fmt: skip
        qualities = sorted(r["quality"] for r in rows)
        label = f"input as {_INPUT_NAMES[codec]} (q{qualities[0]} to q{qualities[-1]})"
        label += f"; below the axis: {', '.join(below)}" if below else ""
        sizes = [r["bytes_per_sample"] for r in rows]
        shown = [max(100 * r["accuracy"], floor) for r in rows]
        ax.plot(sizes, shown, style, color="grey" if codec == "jpeg" else "tab:brown",
                markersize=6, label=label)  # fmt: skip
    _mark_equal_accuracy(ax, report.get("equal_accuracy"))
    ax.set_ylim(bottom=floor)
    ax.set(xscale="log", xlabel="bytes per sample (log)", ylabel="top-1 accuracy (%)")
    ax.set_title("Accuracy against bytes per sample")
    save(plt, fig, ax, path, below=True)
