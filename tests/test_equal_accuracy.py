"""Comparing the split with sending the input at equal accuracy (tandem.equal_accuracy)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tandem.data import load_data
from tandem.equal_accuracy import at_equal_accuracy, cheapest_within
from tandem.evaluate import Point, evaluate_bundle
from tandem.input_codecs import InputPoint


@dataclass(frozen=True)
class _At:
    accuracy: float
    bytes_per_sample: float


def test_the_cheapest_point_close_enough_wins_and_the_boundary_counts() -> None:
    points = [_At(0.90, 100), _At(0.89, 40), _At(0.85, 10), _At(0.895, 60)]
    # 0.89 is exactly 1 pp below 0.90: inside, although 0.90 - 0.01 is not exactly 0.89.
    assert cheapest_within(points, 0.90, 0.01) == _At(0.89, 40)
    assert cheapest_within(points, 0.90, 0.0) == _At(0.90, 100)
    assert cheapest_within(points, 0.99, 0.01) is None
    assert cheapest_within([], 0.5, 0.5) is None


def test_the_ratio_is_bottleneck_over_input_bytes_and_missing_routes_give_none() -> None:
    inputs = [InputPoint("webp", 75, 0.86, 330.0), InputPoint("png", None, 0.87, 2300.0)]
    split = [Point(1.0, 0.865, 80.0, "entropy", point=0, beta=0.6), Point(1.0, 0.80, 20.0)]
    got = at_equal_accuracy(0.87, split, inputs, 0.01)
    assert got.input == inputs[0] and got.bottleneck == split[0]
    assert got.ratio == pytest.approx(80 / 330)
    doc = got.to_dict()
    assert doc["input"]["quality"] == 75 and doc["bottleneck"]["beta"] == 0.6
    assert doc["ratio"] == pytest.approx(80 / 330) and doc["within"] == 0.01
    none = at_equal_accuracy(0.87, [split[1]], inputs, 0.01)
    assert none.bottleneck is None and none.ratio is None
    assert none.to_dict()["bottleneck"] is None
    with pytest.raises(ValueError, match="within must be >= 0"):
        at_equal_accuracy(0.87, split, inputs, -0.01)


def test_eval_compares_the_routes_from_its_own_points(digits_bundle: Path) -> None:
    test = load_data("digits").test
    report = evaluate_bundle(digits_bundle, test, [8, 2], within=0.02)
    compared = report["equal_accuracy"]
    teacher = report["teacher"]["accuracy"]
    assert compared["teacher_accuracy"] == teacher and compared["within"] == 0.02

    def cheapest(rows: list[dict]) -> dict | None:
        close = [r for r in rows if r["accuracy"] >= teacher - 0.02 - 1e-9]
        return min(close, key=lambda r: r["bytes_per_sample"], default=None)

    assert compared["input"] == cheapest(report["input_codecs"])
    assert compared["bottleneck"] == cheapest(report["points"])
    # PNG is lossless, so the input route always has a point at the teacher's accuracy.
    assert compared["input"] is not None
    if compared["bottleneck"] is not None:
        ratio = compared["bottleneck"]["bytes_per_sample"] / compared["input"]["bytes_per_sample"]
        assert compared["ratio"] == pytest.approx(ratio)
    else:
        assert compared["ratio"] is None
