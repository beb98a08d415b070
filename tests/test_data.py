"""Data specs: digits, npz and image folders load with the right splits and shapes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tandem.data import DataSpecError, channel_stats, load_data, normalize


def test_digits() -> None:
    data = load_data("digits")
    assert data.input_shape == (1, 8, 8)
    assert len(data.train) + len(data.test) == 1797
    assert len(data.test) == 359
    assert data.train.x.dtype == np.uint8 and data.train.x.max() == 255
    assert data.classes == [str(i) for i in range(10)]


def test_npz_last_rows_are_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10_050, 6, 5), dtype=np.uint8)
    y = rng.integers(0, 3, 10_050)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_data(f"npz:{tmp_path / 'd.npz'}")
    assert data.input_shape == (1, 6, 5)
    assert len(data.train) == 50 and len(data.test) == 10_000
    np.testing.assert_array_equal(data.test.x[:, 0], x[-10_000:])
    np.testing.assert_array_equal(data.train.y, y[:50])


def test_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(DataSpecError, match="no such file"):
        load_data(f"npz:{tmp_path / 'absent.npz'}")
    np.savez(tmp_path / "f.npz", x=np.zeros((20_000, 4, 4), np.float32), y=np.zeros(20_000))
    with pytest.raises(DataSpecError, match="uint8"):
        load_data(f"npz:{tmp_path / 'f.npz'}")
    np.savez(tmp_path / "k.npz", a=np.zeros(3))
    with pytest.raises(DataSpecError, match="'x' and 'y'"):
        load_data(f"npz:{tmp_path / 'k.npz'}")


def _write_folder(root: Path, sizes: dict[str, tuple[int, int]]) -> None:
    rng = np.random.default_rng(1)
    for label, size in sizes.items():
        (root / label).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")


def test_imagefolder_holdout_and_resize(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"cat": (12, 10), "dog": (12, 10), "eel": (9, 9)})
    data = load_data(f"imagefolder:{tmp_path}")
    assert data.classes == ["cat", "dog", "eel"]
    assert data.input_shape == (3, 12, 10)
    assert len(data.train) + len(data.test) == 15 and len(data.test) == 3


def test_imagefolder_train_test_dirs(tmp_path: Path) -> None:
    _write_folder(tmp_path / "train", {"a": (8, 8), "b": (8, 8)})
    _write_folder(tmp_path / "test", {"a": (8, 8), "b": (8, 8)})
    data = load_data(f"imagefolder:{tmp_path}")
    assert len(data.train) == 10 and len(data.test) == 10


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataSpecError, match="no such directory"):
        load_data(f"imagefolder:{tmp_path / 'absent'}")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataSpecError, match="no PNG or JPEG"):
        load_data(f"imagefolder:{tmp_path}")


@pytest.mark.parametrize("spec", ["", "mnist", "npz:", "digits:x", "imagefolder"])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(DataSpecError, match="unknown data spec"):
        load_data(spec)


def test_normalize_uses_stats() -> None:
    x = np.random.default_rng(2).integers(0, 256, (64, 2, 4, 4), dtype=np.uint8)
    mean, std = channel_stats(x)
    t = normalize(x, mean, std)
    assert t.shape == (64, 2, 4, 4)
    assert abs(float(t.mean())) < 1e-4
    assert float(t.std()) == pytest.approx(1.0, abs=0.02)


def test_imagefolder_colour_is_decided_over_both_splits(tmp_path: Path) -> None:
    _write_folder(tmp_path / "train", {"a": (8, 8), "b": (8, 8)})
    for label in ("a", "b"):
        (tmp_path / "test" / label).mkdir(parents=True)
        grey = np.full((8, 8), 77, dtype=np.uint8)
        Image.fromarray(grey).save(tmp_path / "test" / label / "g.png")
    data = load_data(f"imagefolder:{tmp_path}")
    assert data.train.x.shape[1] == data.test.x.shape[1] == 3


def test_imagefolder_empty_test_split(tmp_path: Path) -> None:
    _write_folder(tmp_path / "train", {"a": (8, 8)})
    (tmp_path / "test" / "a").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    with pytest.raises(DataSpecError, match="test"):
        load_data(f"imagefolder:{tmp_path}")


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((10_001, 4, 4), np.uint8), np.zeros((10_001, 1), np.int64), "'y'"),
        (np.zeros((10_001, 4, 4), np.uint8), np.full(10_001, 0.5), "'y'"),
        (np.zeros((10_001, 4, 4), np.uint8), np.full(10_001, -1), "'y'"),
        (np.zeros((10_001, 3, 8, 8), np.uint8), np.zeros(10_001, np.int64), r"\(N, H, W, C\)"),
    ],
)
def test_npz_label_and_layout_checks(
    tmp_path: Path, x: np.ndarray, y: np.ndarray, message: str
) -> None:
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(DataSpecError, match=message):
        load_data(f"npz:{tmp_path / 'd.npz'}")


def test_channel_stats_match_a_float64_reference() -> None:
    x = np.random.default_rng(3).integers(0, 256, (50, 3, 5, 5), dtype=np.uint8)
    mean, std = channel_stats(x)
    ref = x.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(std, ref.std(axis=(0, 2, 3)), rtol=1e-6)


def test_a_small_npz_holds_out_the_seeded_fraction_digits_uses(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (500, 6, 5), dtype=np.uint8)
    y = rng.integers(0, 3, 500)
    np.savez(tmp_path / "small.npz", x=x, y=y)
    data = load_data(f"npz:{tmp_path / 'small.npz'}")
    assert (len(data.train), len(data.test)) == (400, 100)
    order = np.random.default_rng(0).permutation(500)  # digits' holdout: seed 0, last 20%
    np.testing.assert_array_equal(data.test.x[:, 0], x[order[-100:]])
    np.testing.assert_array_equal(data.train.y, y[order[:-100]])


def test_an_npz_of_one_row_has_nothing_to_train_on(tmp_path: Path) -> None:
    np.savez(tmp_path / "one.npz", x=np.zeros((1, 4, 4), np.uint8), y=np.zeros(1, np.int64))
    with pytest.raises(DataSpecError, match="at least 2"):
        load_data(f"npz:{tmp_path / 'one.npz'}")
    np.savez(tmp_path / "odd.npz", x=np.zeros((5, 4, 4), np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(DataSpecError, match="5 images and 4 labels"):
        load_data(f"npz:{tmp_path / 'odd.npz'}")


def _good_and_bad(root: Path) -> Path:
    """Classes a and b of two good images each; b also holds an unreadable "JPEG"."""
    _write_folder(root, {"a": (8, 8), "b": (8, 8)})
    bad = root / "b" / "bad.jpg"
    bad.write_bytes(b"this is not a JPEG")
    return bad


def _truncated_jpeg(path: Path) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_an_unreadable_image_is_one_line_naming_it(tmp_path: Path, kind: str) -> None:
    bad = _good_and_bad(tmp_path)
    if kind == "truncated":
        _truncated_jpeg(bad)
    with pytest.raises(DataSpecError) as info:
        load_data(f"imagefolder:{tmp_path}")
    message = str(info.value)
    assert message.startswith(f"cannot read image {bad}: ") and "\n" not in message
    assert "--skip-unreadable" in message


def test_unreadable_images_can_be_skipped_and_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = _good_and_bad(tmp_path)
    _truncated_jpeg(tmp_path / "a" / "cut.jpg")
    data = load_data(f"imagefolder:{tmp_path}", skip_unreadable=True)
    assert len(data.train) + len(data.test) == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"skipped 2 unreadable images under {tmp_path}")
    assert str(tmp_path / "a" / "cut.jpg") in warnings[0] or str(bad) in warnings[0]


def test_an_empty_class_is_one_line_naming_it(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"a": (8, 8), "b": (8, 8)})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("nothing here")
    with pytest.raises(
        DataSpecError, match=re.escape(f"class 'c' has no PNG or JPEG images in {tmp_path / 'c'}")
    ):
        load_data(f"imagefolder:{tmp_path}")
    # A class whose every image is unreadable is empty too, once they are skipped.
    (tmp_path / "c" / "x.png").write_bytes(b"not a PNG")
    with pytest.raises(DataSpecError, match="class 'c' has no PNG or JPEG images"):
        load_data(f"imagefolder:{tmp_path}", skip_unreadable=True)


def test_files_that_are_not_images_are_ignored_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_folder(tmp_path, {"a": (8, 8), "b": (8, 8)})
    (tmp_path / "a" / "notes.txt").write_text("a note")
    (tmp_path / "b" / "Thumbs.db").write_bytes(b"\0" * 8)
    data = load_data(f"imagefolder:{tmp_path}")
    assert len(data.train) + len(data.test) == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"ignored 2 files under {tmp_path} that are not PNG or JPEG (first: "
        f"{tmp_path / 'a' / 'notes.txt'})"
    ]
