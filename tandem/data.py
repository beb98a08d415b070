"""Data sets named by a spec string.

A spec is one of:

- ``digits``: the 8x8 hand-written digits (1,797 images) shipped as ``tandem/digits.npz``, the
  embedded default;
- ``npz:PATH``: a NumPy archive with arrays ``x`` (uint8 images, ``(N, H, W)`` or
  ``(N, H, W, C)``) and ``y`` (integer labels). With more than 10,000 rows the last 10,000 are
  the test split (the layout of MNIST-style train + test archives); a smaller archive holds
  out the same seeded 20% as ``digits``;
- ``imagefolder:DIR``: one sub-directory per class holding PNG or JPEG files. If ``DIR`` has
  ``train/`` and ``test/`` sub-directories they are the splits, otherwise a seeded 20% is held out.
  An image that cannot be decoded is an error naming it (or, asked, left out and counted);
  other files are ignored and counted; a class with no image is an error naming it.

Images are kept as uint8 ``(N, C, H, W)`` arrays: that is what a device holds, so the raw-input
baselines are measured on it, and normalisation happens inside the model input pipeline.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

NPZ_TEST_ROWS = 10_000
HOLDOUT_FRACTION = 0.2
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class DataSpecError(ValueError):
    """A data spec could not be parsed or its data could not be read."""


@dataclass(frozen=True)
class Split:
    """Images ``x`` (uint8, N x C x H x W) and integer labels ``y`` of one split."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class DataSet:
    """A train and a test split plus the class names, as loaded from a spec."""

    spec: str
    train: Split
    test: Split
    classes: list[str]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The (C, H, W) shape of one input."""
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)


def check_spec(spec: str) -> None:
    """Check, without reading any data, that ``spec`` has one of the forms and that the file
    or directory it names exists; DataSpecError says what is wrong."""
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return
    if kind == "npz" and arg:
        if not Path(arg).is_file():
            raise DataSpecError(f"{spec}: no such file {arg}")
        return
    if kind == "imagefolder" and arg:
        if not Path(arg).is_dir():
            raise DataSpecError(f"{spec}: no such directory {arg}")
        return
    raise DataSpecError(
        f"unknown data spec {spec!r}: expected 'digits', 'npz:PATH' or 'imagefolder:DIR'"
    )


def load_data(spec: str, *, skip_unreadable: bool = False) -> DataSet:
    """Load the data set named by ``spec`` (see the module docstring for the forms).

    An image folder's image that cannot be decoded is a DataSpecError naming it, unless
    ``skip_unreadable``: then it is left out, and one warning counts what was left out. Files
    without a PNG or JPEG suffix are ignored, with one warning counting them; a class left
    with no image is a DataSpecError naming it.
    """
    check_spec(spec)
    kind, _, arg = spec.partition(":")
    if kind == "npz":
        return _load_npz(spec, Path(arg))
    if kind == "imagefolder":
        return _load_imagefolder(spec, Path(arg), skip_unreadable)
    return _load_digits(spec)


def _as_nchw(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim == 4:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise DataSpecError(f"images must be (N, H, W) or (N, H, W, C), got shape {x.shape}")


def _holdout(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[Split, Split]:
    """The seeded 20% test split of data without one of its own (at least 2 rows)."""
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = max(1, round(len(y) * HOLDOUT_FRACTION))
    train, test = order[:-n_test], order[-n_test:]
    return Split(x[train], y[train]), Split(x[test], y[test])


DIGITS_FILE = Path(__file__).with_name("digits.npz")


def _load_digits(spec: str) -> DataSet:
    # scikit-learn's 8x8 digits (UCI ML hand-written digits, CC BY 4.0), shipped as 45 KB so
    # the demo and a device install need no scikit-learn: `images` hold 0..16, `target` 0..9.
    with np.load(DIGITS_FILE) as arrays:
        images, target = arrays["images"], arrays["target"]
    # The bundled images hold 0..16 intensities; stretch them to the uint8 range a camera gives.
    x = np.rint(images * (255.0 / 16.0)).astype(np.uint8)
    train, test = _holdout(_as_nchw(x), target.astype(np.int64))
    return DataSet(spec, train, test, [str(c) for c in range(10)])


def _load_npz(spec: str, path: Path) -> DataSet:
    try:
        with np.load(path, allow_pickle=False) as archive:
            x, y = archive["x"], archive["y"]
    except (KeyError, ValueError, OSError) as exc:
        raise DataSpecError(f"{spec}: cannot read arrays 'x' and 'y': {exc}") from exc
    if x.dtype != np.uint8:
        raise DataSpecError(f"{spec}: 'x' must be uint8 images, got {x.dtype}")
    if y.ndim != 1 or y.dtype.kind not in "iu" or (len(y) and y.min() < 0):
        raise DataSpecError(f"{spec}: 'y' must be non-negative integer labels, one per image")
    if x.ndim == 4 and x.shape[-1] not in (1, 3, 4):
        raise DataSpecError(f"{spec}: 4-D images must be (N, H, W, C) with 1, 3 or 4 channels")
    if len(x) != len(y):
        raise DataSpecError(
            f"{spec}: need one label per image, got {len(x)} images and {len(y)} labels"
        )
    if len(x) < 2:
        raise DataSpecError(f"{spec}: need at least 2 rows to train and test on, got {len(x)}")
    x, y = _as_nchw(x), y.astype(np.int64)
    train, test = _npz_splits(x, y)
    return DataSet(spec, train, test, [str(c) for c in range(int(y.max()) + 1)])


def _npz_splits(x: np.ndarray, y: np.ndarray) -> tuple[Split, Split]:
    """An archive's train and test splits: its last NPZ_TEST_ROWS rows are the test split when
    there are more, else the seeded holdout of :func:`_holdout`."""
    if len(y) > NPZ_TEST_ROWS:
        return Split(x[:-NPZ_TEST_ROWS], y[:-NPZ_TEST_ROWS]), Split(
            x[-NPZ_TEST_ROWS:], y[-NPZ_TEST_ROWS:]
        )
    return _holdout(x, y)


def _class_dirs(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataSpecError(f"{root}: expected one sub-directory per class")
    return dirs


@dataclass
class _Reading:
    """What reading one image folder met besides images: files left out, by kind."""

    skip_unreadable: bool
    unreadable: list[str] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)

    def report(self, root: Path) -> None:
        """One warning per kind of file left out, with a count and the first of them."""
        if self.unreadable:
            log.warning("skipped %d unreadable images under %s (first: %s)",
                        len(self.unreadable), root, self.unreadable[0])  # fmt: skip
        if self.ignored:
            log.warning("ignored %d files under %s that are not PNG or JPEG (first: %s)",
                        len(self.ignored), root, self.ignored[0])  # fmt: skip


def _read_images(
    root: Path, classes: list[str], reading: _Reading
) -> tuple[list[np.ndarray], list[int]]:
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        found = 0
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or path.is_dir():
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                reading.ignored.append(path)
                continue
            image = _read_image(path, reading)
            if image is not None:
                images.append(image)
                labels.append(label)
                found += 1
        if not found:
            raise DataSpecError(f"class {name!r} has no PNG or JPEG images in {folder}")
    return images, labels


def _read_image(path: Path, reading: _Reading) -> np.ndarray | None:
    """The image's RGB pixels; None when it is unreadable and such images are skipped."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's decoders raise all three
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not reading.skip_unreadable:
            raise DataSpecError(
                f"cannot read image {path}: {why} (--skip-unreadable leaves such files out)"
            ) from exc
        reading.unreadable.append(f"{path}: {why}")
        return None


def _stack(images: list[np.ndarray], size: tuple[int, int], grey: bool) -> np.ndarray:
    from PIL import Image

    out = []
    for img in images:
        if img.shape[:2] != size:
            resized = Image.fromarray(img).resize((size[1], size[0]), Image.Resampling.BILINEAR)
            img = np.asarray(resized)
        out.append(img[..., :1] if grey else img)
    return _as_nchw(np.stack(out))


def _is_grey(image: np.ndarray) -> bool:
    return bool(
        np.array_equal(image[..., 0], image[..., 1])
        and np.array_equal(image[..., 1], image[..., 2])
    )


def _load_imagefolder(spec: str, root: Path, skip_unreadable: bool) -> DataSet:
    has_splits = (root / "train").is_dir() and (root / "test").is_dir()
    class_root = root / "train" if has_splits else root
    classes = [p.name for p in _class_dirs(class_root)]
    names = ("train", "test") if has_splits else ("",)
    reading = _Reading(skip_unreadable)
    parts = {name: _read_images(root / name, classes, reading) for name in names}
    reading.report(root)
    for name, (images, _) in parts.items():
        if not images:
            raise DataSpecError(f"{spec}: no PNG or JPEG images found in {root / name}")
    every = [img for images, _ in parts.values() for img in images]
    # Mixed sizes are common in hand-made folders; resize to the most frequent one. Colour is
    # decided over every split at once, so train and test always get the same channels.
    size = Counter(img.shape[:2] for img in every).most_common(1)[0][0]
    grey = all(_is_grey(img) for img in every)
    splits = {
        name: (_stack(images, size, grey), np.asarray(labels, dtype=np.int64))
        for name, (images, labels) in parts.items()
    }
    if has_splits:
        train, test = Split(*splits["train"]), Split(*splits["test"])
    else:
        train, test = _holdout(*splits[""])
    log.info("loaded %d train / %d test images from %s", len(train), len(test), root)
    return DataSet(spec, train, test, classes)


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images, on the [0, 1] scale."""
    mean, std = [], []
    for c in range(x.shape[1]):
        # One channel at a time, and float64 accumulation without a float64 copy of the set.
        channel = x[:, c]
        m = channel.mean(dtype=np.float64) / 255.0
        var = np.square(channel, dtype=np.float64).mean() / 255.0**2 - m * m
        mean.append(float(m))
        std.append(float(max(np.sqrt(max(var, 0.0)), 1e-3)))
    return mean, std


def normalize(x: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """Turn uint8 ``(N, C, H, W)`` images into the float tensor the models take."""
    # float32 conversion copies anyway; doing it in numpy also accepts read-only inputs.
    t = torch.from_numpy(x.astype(np.float32)).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return t.sub_(m).div_(s)
