"""Sending the input instead: codec round trips, and the teacher's accuracy on them in eval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandem.data import load_data
from tandem.evaluate import evaluate_bundle
from tandem.input_codecs import QUALITIES, round_trip


def _photo(channels: int) -> np.ndarray:
    """A smooth gradient with noise: lossy codecs lose some of it, more at low quality."""
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(32), np.arange(32)).astype(float) * 4
    pixels = ramp[None] + rng.normal(0, 20, (channels, 32, 32))
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_round_trips_keep_the_layout_and_png_loses_nothing(channels: int) -> None:
    image = _photo(channels)
    for codec, qualities in QUALITIES.items():
        for quality in qualities:
            back, size = round_trip(image, codec, quality)
            assert back.shape == image.shape and back.dtype == np.uint8 and size > 0
    png, _ = round_trip(image, "png", None)
    assert np.array_equal(png, image)
    low, low_size = round_trip(image, "jpeg", 5)
    high, high_size = round_trip(image, "jpeg", 90)
    assert low_size < high_size
    error = [float(np.abs(b.astype(int) - image).mean()) for b in (low, high)]
    assert error[0] > error[1] > 0


def test_an_unknown_codec_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown input codec 'gif'"):
        round_trip(_photo(1), "gif", None)


def test_eval_reports_the_teacher_on_every_input_codec(digits_bundle: Path) -> None:
    test = load_data("digits").test
    report = evaluate_bundle(digits_bundle, test, [4])
    rows = report["input_codecs"]
    expected = [(c, q) for c, qs in QUALITIES.items() for q in qs]
    assert [(r["codec"], r["quality"]) for r in rows] == expected
    png = rows[-1]
    # Lossless: the teacher's own accuracy, at the size the lossless baseline measured.
    assert png["accuracy"] == report["teacher"]["accuracy"]
    assert png["bytes_per_sample"] == pytest.approx(report["baselines"]["png"])
    jpeg = [r["bytes_per_sample"] for r in rows if r["codec"] == "jpeg"]
    assert jpeg == sorted(jpeg)  # more quality, more bytes
    assert all(0 <= r["accuracy"] <= 1 for r in rows)


def test_the_chart_keeps_its_axis_on_the_bottleneck_and_names_what_falls_below(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tandem.sim import charts

    seen: dict = {}

    def keep(plt: object, fig: object, ax: object, path: Path, below: bool = False) -> None:
        seen["labels"] = [line.get_label() for line in ax.get_lines()]  # type: ignore[attr-defined]
        seen["bottom"] = ax.get_ylim()[0]  # type: ignore[attr-defined]
        plt.close(fig)  # type: ignore[attr-defined]

    monkeypatch.setattr(charts, "save", keep)
    report = {
        "points": [_entropy(1.0, 0.3, 0.98, 20)],
        "teacher": {"accuracy": 0.99},
        "baselines": {"png": 100.0},
        "input_codecs": [
            {"codec": "jpeg", "quality": 5, "accuracy": 0.5, "bytes_per_sample": 300.0},
            {"codec": "jpeg", "quality": 50, "accuracy": 0.99, "bytes_per_sample": 400.0},
        ],
    }
    charts.plot_rate_accuracy(report, tmp_path / "chart.png")
    assert seen["bottom"] == pytest.approx(97.0)  # the lowest bottleneck point, less 1 pp
    assert "input as JPEG (q5 to q50); below the axis: q5 50.0%" in seen["labels"]


def _drawn(report: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, list]:
    """The chart's lines for ``report``, by label: their (x, y) data."""
    from tandem.sim import charts

    seen: dict[str, list] = {}

    def keep(plt: object, fig: object, ax: object, path: Path, below: bool = False) -> None:
        for line in ax.get_lines():  # type: ignore[attr-defined]
            seen[line.get_label()] = list(zip(line.get_xdata(), line.get_ydata(), strict=True))
        plt.close(fig)  # type: ignore[attr-defined]

    monkeypatch.setattr(charts, "save", keep)
    charts.plot_rate_accuracy(report, tmp_path / "chart.png")
    return seen


def _entropy(width: float, beta: float, accuracy: float, size: float) -> dict:
    return {"width": width, "codec": "entropy", "beta": beta, "accuracy": accuracy,
            "bytes_per_sample": size}  # fmt: skip


def test_one_width_draws_its_rate_points_as_one_curve_and_marks_equal_accuracy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    webp = {"codec": "webp", "quality": 75, "accuracy": 0.985, "bytes_per_sample": 300.0}
    best = _entropy(1.0, 0.6, 0.982, 60.0)
    report = {
        "points": [_entropy(1.0, 0.2, 0.99, 120.0), best, _entropy(1.0, 1.8, 0.95, 30.0)],
        "teacher": {"accuracy": 0.99},
        "baselines": {},
        "input_codecs": [webp],
        "equal_accuracy": dict(
            teacher_accuracy=0.99, within=0.01, input=webp, bottleneck=best, ratio=0.2
        ),
    }
    lines = _drawn(report, monkeypatch, tmp_path)
    assert lines["entropy-coded, β=0.2 to 1.8"] == [(30.0, 95.0), (60.0, 98.2), (120.0, 99.0)]
    assert lines["cheapest bottleneck within 1 pp (60 B)"] == [(60.0, 98.2)]
    assert lines["cheapest input within 1 pp (300 B)"] == [(300.0, 98.5)]
    assert lines["1 pp below the teacher"][0][1] == pytest.approx(98.0)


def test_several_widths_draw_each_rate_point_across_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    points = [_entropy(w, b, 0.9, 10 * w + b) for w in (0.5, 1.0) for b in (0.1, 1.0)]
    report = {"points": points, "teacher": {"accuracy": None}, "baselines": {}}
    lines = _drawn(report, monkeypatch, tmp_path)
    assert lines["entropy-coded, β=0.1"] == [(5.1, 90.0), (10.1, 90.0)]
    assert lines["entropy-coded, β=1"] == [(6.0, 90.0), (11.0, 90.0)]
    assert not any(label.startswith("cheapest") for label in lines)


def test_the_charts_legend_sits_under_its_axes_and_covers_no_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rate-accuracy chart's legend is long (a line per curve and mark): it is drawn under
    the x axis's labels, and the saved image grows to hold it."""
    from tandem.sim import charts

    real, boxes = charts.save, {}

    class KeepOpen:
        """pyplot, but the figure stays open for measuring after ``save`` has drawn it."""

        def close(self, fig: Any) -> None:
            pass

    def measure(plt: Any, fig: Any, ax: Any, path: Path, below: bool = False) -> None:
        real(KeepOpen(), fig, ax, path, below)
        renderer = fig.canvas.get_renderer()
        boxes["axis"] = ax.xaxis.get_tightbbox(renderer)  # ticks, labels and the axis label
        boxes["legend"] = ax.get_legend().get_window_extent(renderer)
        boxes["figure"] = fig.get_window_extent(renderer)
        plt.close(fig)

    monkeypatch.setattr(charts, "save", measure)
    report = {
        "points": [_entropy(1.0, 0.3, 0.98, 20), _entropy(1.0, 1.0, 0.97, 12)],
        "teacher": {"accuracy": 0.99},
        "baselines": {"png": 100.0},
        "input_codecs": [
            {"codec": "webp", "quality": q, "accuracy": a, "bytes_per_sample": b}
            for q, a, b in ((5, 0.9, 40.0), (50, 0.985, 80.0), (90, 0.99, 120.0))
        ],
    }
    charts.plot_rate_accuracy(report, tmp_path / "chart.png")
    assert boxes["legend"].y1 <= boxes["axis"].y0
    # The saved image grows to hold the legend rather than cutting it off.
    from PIL import Image

    with Image.open(tmp_path / "chart.png") as png:
        assert png.height > boxes["figure"].height
