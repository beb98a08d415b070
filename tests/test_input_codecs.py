"""Sending the input instead: codec round trips, and the teacher's accuracy on them in eval."""

from __future__ import annotations

from pathlib import Path

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

    def keep(plt: object, fig: object, ax: object, path: Path) -> None:
        seen["labels"] = [line.get_label() for line in ax.get_lines()]  # type: ignore[attr-defined]
        seen["bottom"] = ax.get_ylim()[0]  # type: ignore[attr-defined]
        plt.close(fig)  # type: ignore[attr-defined]

    monkeypatch.setattr(charts, "save", keep)
    report = {
        "points": [{"codec": "entropy", "beta": 0.3, "accuracy": 0.98, "bytes_per_sample": 20}],
        "teacher": {"accuracy": 0.99},
        "baselines": {"png": 100.0},
        "input_codecs": [
            {"codec": "jpeg", "quality": 5, "accuracy": 0.5, "bytes_per_sample": 300.0},
            {"codec": "jpeg", "quality": 50, "accuracy": 0.99, "bytes_per_sample": 400.0},
        ],
    }
    charts.plot_rate_accuracy(report, tmp_path / "chart.png")
    assert seen["bottom"] == pytest.approx(97.0)  # the lowest bottleneck point, less 1 pp
    assert "input as JPEG (q5 to q90); below the axis: q5 50.0%" in seen["labels"]
