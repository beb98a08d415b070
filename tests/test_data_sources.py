"""Data specs as edge sources: ``digits`` and small ``npz:`` files serve the test split that
``tandem.data`` holds out, the same rows a bundle was evaluated on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tandem.data import load_data
from tandem.edge.sources import SourceError, open_source

DIGIT_LABELS = [str(i) for i in range(10)]


def _rows(source_spec: str, shape: tuple[int, int, int]) -> tuple[np.ndarray, list[int | None]]:
    source = open_source(source_spec, shape, DIGIT_LABELS)
    items = list(source.iter_from(0))
    assert all(it.error is None and it.x is not None for it in items)
    return np.stack([it.x for it in items if it.x is not None]), [it.label for it in items]


def test_digits_is_a_source_of_its_test_split() -> None:
    test = load_data("digits").test
    x, labels = _rows("digits", (1, 8, 8))
    np.testing.assert_array_equal(x, test.x)
    assert labels == test.y.tolist()
    assert open_source("digits", (1, 8, 8), DIGIT_LABELS).key == "digits"


def test_a_small_npz_is_a_source_of_its_held_out_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "s.npz", x=rng.integers(0, 256, (50, 4, 4), dtype=np.uint8),
             y=rng.integers(0, 10, 50))  # fmt: skip
    spec = f"npz:{tmp_path / 's.npz'}"
    x, labels = _rows(spec, (1, 4, 4))
    test = load_data(spec).test
    assert len(x) == 10
    np.testing.assert_array_equal(x, test.x)
    assert labels == test.y.tolist()


def test_digits_refuses_a_bundle_of_another_shape() -> None:
    with pytest.raises(SourceError, match="bundle takes"):
        open_source("digits", (1, 28, 28), DIGIT_LABELS)
