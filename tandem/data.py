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

Images are uint8 ``(N, C, H, W)``: that is what a device holds, so the raw-input baselines are
measured on it, and normalisation happens inside the model input pipeline. Digits and npz
archives are arrays in memory; an image folder is read on demand: loading decodes each file
once to check it and learn its size and colour, keeping nothing but its path, and training and
evaluation stream it through ``torch.utils.data`` with worker processes (:meth:`Split.batches`).

From Python, :func:`from_datasets` makes a DataSet of a user's own map-style data sets.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # PyTorch is imported where it is used: a device reads data without it
    import torch

log = logging.getLogger(__name__)

NPZ_TEST_ROWS = 10_000
HOLDOUT_FRACTION = 0.2
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# Reader processes for an image folder: decoding a small JPEG takes tens of microseconds, so
# two keep ahead of a model on two cores without taking a core from it for long.
DEFAULT_WORKERS = 2


class DataSpecError(ValueError):
    """A data spec could not be parsed or its data could not be read."""


@dataclass(frozen=True)
class ArrayImages:
    """Images held in memory as one uint8 ``(N, C, H, W)`` array (digits, npz archives)."""

    array: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (C, H, W) shape of one image."""
        c, h, w = self.array.shape[1:]
        return int(c), int(h), int(w)

    def take(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The images at ``rows``, as a uint8 ``(len(rows), C, H, W)`` array."""
        return self.array[np.asarray(rows, dtype=np.int64)]


@dataclass(frozen=True)
class FileImages:
    """Images left on disk, decoded each time they are taken: nothing is kept in memory but
    the paths. Every file decoded when the folder was loaded, so one that fails here changed
    on disk since: a DataSpecError naming it."""

    paths: tuple[Path, ...]
    size: tuple[int, int]
    grey: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (C, H, W) shape of one image."""
        return (1 if self.grey else 3, *self.size)

    def take(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The images at ``rows``, each decoded and resized to :attr:`size`."""
        images = [_decode_again(self.paths[int(i)]) for i in rows]
        return _stack(images, self.size, self.grey, self.shape)


@dataclass(frozen=True)
class DatasetImages:
    """Images read item by item from a user's map-style ``torch.utils.data.Dataset`` whose
    items are ``(uint8 image tensor (C, H, W), integer label)``; ``index`` maps this split's
    rows to the data set's indices. Each item is checked as it is read: a wrong type, dtype
    or shape is a DataSpecError naming the index."""

    dataset: torch.utils.data.Dataset[Any]
    index: np.ndarray
    image_shape: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (C, H, W) shape of one image."""
        return self.image_shape

    def take(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The images at ``rows``, as a uint8 ``(len(rows), C, H, W)`` array."""
        images = [dataset_item(self.dataset, int(self.index[int(i)]))[0] for i in rows]
        for i, image in zip(rows, images, strict=True):
            if image.shape != self.image_shape:
                raise DataSpecError(
                    f"item {int(self.index[int(i)])} has shape {image.shape}, the first had "
                    f"{self.image_shape}"
                )
        return np.stack(images) if images else np.zeros((0, *self.image_shape), np.uint8)


Images = ArrayImages | FileImages | DatasetImages


@dataclass(frozen=True)
class Split:
    """One split: integer labels ``y`` in memory, images read on demand from ``images``.

    :meth:`take` reads a few rows; :meth:`batches` streams the split through a
    ``torch.utils.data.DataLoader`` (worker processes decode the files of an image folder);
    :attr:`x` reads the whole split into one array, for the small test splits that tools
    handle at once.
    """

    images: Images
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (C, H, W) shape of one image."""
        return self.images.shape

    @property
    def x(self) -> np.ndarray:
        """Every image of the split as one uint8 ``(N, C, H, W)`` array (read whole)."""
        images = self.in_memory().images
        assert isinstance(images, ArrayImages)  # what in_memory gives
        return images.array

    def in_memory(self, workers: int | None = None) -> Split:
        """The split with its images read whole into memory, once, through its loader: for
        work that goes over all of them several times. An array split is itself."""
        if isinstance(self.images, ArrayImages):
            return self
        x = np.concatenate([b.x.numpy() for b in self.in_order(1024, workers)])
        return Split(ArrayImages(x), self.y)

    def take(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The images at ``rows``."""
        return self.images.take(rows)

    def subset(self, rows: Sequence[int] | np.ndarray) -> Split:
        """The split restricted to ``rows`` (an array split copies them; a folder's does not)."""
        rows = np.asarray(rows, dtype=np.int64)
        if isinstance(self.images, ArrayImages):
            return Split(ArrayImages(self.images.take(rows)), self.y[rows])
        if isinstance(self.images, DatasetImages):
            images = self.images
            return Split(
                DatasetImages(images.dataset, images.index[rows], images.shape), self.y[rows]
            )
        paths = tuple(self.images.paths[i] for i in rows)
        return Split(FileImages(paths, self.images.size, self.images.grey), self.y[rows])

    def batches(
        self, order: Iterable[torch.Tensor], workers: int | None = None, pin: bool = False
    ) -> Iterator[Batch]:
        """Stream the split in the batches of row indices ``order``, in that order.

        ``workers`` processes read the batches ahead (None: :func:`default_workers`); with 0
        they are read in this process. ``pin`` puts each batch in page-locked memory, for
        an asynchronous copy to a GPU.
        """
        import torch

        workers = default_workers(self) if workers is None else workers
        # _Rows is a map-style data set by duck typing (torch is not imported to define it).
        rows: torch.utils.data.Dataset[Batch | str] = _Rows(self)  # type: ignore[assignment]
        loader: torch.utils.data.DataLoader[Batch | str] = torch.utils.data.DataLoader(
            rows,
            sampler=list(order),
            batch_size=None,  # each sampled item is a whole batch of rows
            num_workers=workers,
            prefetch_factor=4 if workers else None,
            pin_memory=pin,
            # Its own generator: the loader draws a worker seed, which must not move the
            # global RNG that training reseeds per epoch.
            generator=torch.Generator(),
        )
        for item in loader:
            # A worker hands an unreadable file back as its message: raised here, it is one
            # line naming the file rather than the loader's wrapped worker traceback.
            if isinstance(item, str):
                raise DataSpecError(item)
            yield item

    def in_order(
        self, batch_size: int, workers: int | None = None, pin: bool = False
    ) -> Iterator[Batch]:
        """Stream the split front to back in batches of ``batch_size``."""
        import torch

        order = torch.arange(len(self)).split(batch_size)
        return self.batches(order, workers, pin)


@dataclass(frozen=True)
class Batch:
    """Rows of a split read together: their indices, uint8 images and labels."""

    idx: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory (the loader calls this for a CUDA run), so its
        copy to the GPU can run asynchronously."""
        return Batch(self.idx, self.x.pin_memory(), self.y.pin_memory())


class _Rows:
    """A split as a map-style data set whose items are whole batches of rows (or, for a
    batch with a file that no longer decodes, the error's message)."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, rows: torch.Tensor) -> Batch | str:
        import torch

        try:
            x = torch.from_numpy(self.split.take(rows.numpy()))
        except DataSpecError as exc:
            return str(exc)
        return Batch(rows, x, torch.from_numpy(self.split.y[rows.numpy()]))


def default_workers(split: Split) -> int:
    """Reader processes for a split: ``DEFAULT_WORKERS`` for an image folder, whose files
    are decoded as they are read, none for arrays already in memory."""
    return DEFAULT_WORKERS if isinstance(split.images, FileImages) else 0


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
        return self.train.shape


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


def dataset_item(dataset: torch.utils.data.Dataset[Any], index: int) -> tuple[np.ndarray, int]:
    """Item ``index`` of a user's data set as (uint8 ``(C, H, W)`` array, label); a
    DataSpecError names the index and what is wrong with it."""
    item = dataset[index]
    if not (isinstance(item, tuple | list) and len(item) == 2):
        raise DataSpecError(f"item {index} is not an (image, label) pair")
    image, label = item
    # A tensor (or anything else with .numpy(), as a user's data set may yield), or an array.
    array = np.asarray(image.numpy() if hasattr(image, "numpy") else image)
    if array.dtype != np.uint8 or array.ndim != 3:
        raise DataSpecError(
            f"item {index}: the image must be a uint8 (C, H, W) tensor, got "
            f"{array.dtype} of shape {array.shape}"
        )
    try:
        number = int(label)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
        raise DataSpecError(f"item {index}: the label {label!r} is not an integer") from None
    return array, number


def from_datasets(
    train: torch.utils.data.Dataset[Any],
    test: torch.utils.data.Dataset[Any],
    classes: Sequence[str] | None = None,
) -> DataSet:
    """A DataSet over two map-style data sets of ``(uint8 image (C, H, W), label)`` items,
    read item by item while training (with 0 reader processes unless a caller asks for
    more: a user's data set need not be picklable).

    Labels are read up front, from a ``targets`` attribute when the data set has one of its
    length (as torchvision's do), else from every item. ``classes`` names the labels
    0..K-1 (default: the data set's ``classes`` attribute, else the numbers).
    """
    y_train, y_test = _dataset_labels(train), _dataset_labels(test)
    if len(y_train) == 0 or len(y_test) == 0:
        raise DataSpecError("the training and the test data set both need items")
    names = list(classes if classes is not None else getattr(train, "classes", []) or [])
    count = max(int(y_train.max()), int(y_test.max())) + 1
    names = names or [str(i) for i in range(count)]
    if min(int(y_train.min()), int(y_test.min())) < 0 or count > len(names):
        raise DataSpecError(f"labels must lie in 0..{len(names) - 1} ({len(names)} classes)")
    shape = dataset_item(train, 0)[0].shape
    splits = [
        Split(DatasetImages(d, np.arange(len(y)), (shape[0], shape[1], shape[2])), y)
        for d, y in ((train, y_train), (test, y_test))
    ]
    # Names the data in a checkpoint's fingerprint: the classes, the sizes and every label.
    labels = hashlib.sha256(y_train.tobytes() + y_test.tobytes()).hexdigest()[:12]
    sizes = f"{type(train).__qualname__}:{len(y_train)}:{type(test).__qualname__}:{len(y_test)}"
    spec = f"dataset:{sizes}:{labels}"
    return DataSet(spec, splits[0], splits[1], [str(n) for n in names])


def _dataset_labels(dataset: torch.utils.data.Dataset[Any]) -> np.ndarray:
    """Every label of a map-style data set, as int64."""
    length = len(dataset)  # type: ignore[arg-type]  # map-style data sets have a length
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == length:
        return np.asarray(targets, dtype=np.int64)
    return np.array([dataset_item(dataset, i)[1] for i in range(length)], dtype=np.int64)


def _as_nchw(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim == 4:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise DataSpecError(f"images must be (N, H, W) or (N, H, W, C), got shape {x.shape}")


def _holdout(whole: Split, seed: int = 0) -> tuple[Split, Split]:
    """The seeded 20% test split of data without one of its own (at least 2 rows)."""
    order = np.random.default_rng(seed).permutation(len(whole))
    n_test = max(1, round(len(whole) * HOLDOUT_FRACTION))
    return whole.subset(order[:-n_test]), whole.subset(order[-n_test:])


def _in_memory(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(ArrayImages(x), y)


DIGITS_FILE = Path(__file__).with_name("digits.npz")


def _load_digits(spec: str) -> DataSet:
    # scikit-learn's 8x8 digits (UCI ML hand-written digits, CC BY 4.0), shipped as 45 KB so
    # the demo and a device install need no scikit-learn: `images` hold 0..16, `target` 0..9.
    with np.load(DIGITS_FILE) as arrays:
        images, target = arrays["images"], arrays["target"]
    # The bundled images hold 0..16 intensities; stretch them to the uint8 range a camera gives.
    x = np.rint(images * (255.0 / 16.0)).astype(np.uint8)
    train, test = _holdout(_in_memory(_as_nchw(x), target.astype(np.int64)))
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
        return _in_memory(x[:-NPZ_TEST_ROWS], y[:-NPZ_TEST_ROWS]), _in_memory(
            x[-NPZ_TEST_ROWS:], y[-NPZ_TEST_ROWS:]
        )
    return _holdout(_in_memory(x, y))


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


@dataclass(frozen=True)
class _Found:
    """One readable image of a folder: where it is, its class, its size and colour."""

    path: Path
    label: int
    size: tuple[int, int]
    grey: bool


def _scan_images(root: Path, classes: list[str], reading: _Reading) -> list[_Found]:
    """Decode every image once (keeping none) to learn sizes and colour and to find the
    unreadable ones before training starts rather than in the middle of an epoch."""
    found: list[_Found] = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        before = len(found)
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or path.is_dir():
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                reading.ignored.append(path)
                continue
            try:
                image = _decode(path)
            except DataSpecError as exc:
                if not reading.skip_unreadable:
                    raise DataSpecError(
                        f"cannot read image {path}: {exc} (--skip-unreadable leaves such files out)"
                    ) from exc
                reading.unreadable.append(f"{path}: {exc}")
                continue
            found.append(_Found(path, label, image.shape[:2], _is_grey(image)))
        if len(found) == before:
            raise DataSpecError(f"class {name!r} has no PNG or JPEG images in {folder}")
    return found


def _decode(path: Path) -> np.ndarray:
    """The image's RGB pixels (H, W, 3); DataSpecError with the decoder's reason if it
    cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    # PIL's decoders raise the first three; the last is its guard against huge images.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataSpecError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc


def _decode_again(path: Path) -> np.ndarray:
    """An image the folder's scan decoded, decoded again for use."""
    try:
        return _decode(path)
    except DataSpecError as exc:
        raise DataSpecError(
            f"cannot read image {path}: {exc} (it decoded when the folder was loaded: it changed "
            "on disk since)"
        ) from exc


def _stack(
    images: list[np.ndarray], size: tuple[int, int], grey: bool, shape: tuple[int, ...]
) -> np.ndarray:
    """Images of any size as one uint8 ``(N, C, H, W)`` array of ``size`` (an empty list gives
    an empty array of ``shape``)."""
    from PIL import Image

    out = []
    for img in images:
        if img.shape[:2] != size:
            resized = Image.fromarray(img).resize((size[1], size[0]), Image.Resampling.BILINEAR)
            img = np.asarray(resized)
        out.append(img[..., :1] if grey else img)
    if not out:
        return np.zeros((0, *shape), np.uint8)
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
    parts = {name: _scan_images(root / name, classes, reading) for name in names}
    reading.report(root)
    for name, found in parts.items():
        if not found:
            raise DataSpecError(f"{spec}: no PNG or JPEG images found in {root / name}")
    every = [f for found in parts.values() for f in found]
    # Mixed sizes are common in hand-made folders; resize to the most frequent one. Colour is
    # decided over every split at once, so train and test always get the same channels.
    size = Counter(f.size for f in every).most_common(1)[0][0]
    grey = all(f.grey for f in every)
    splits = {
        name: Split(
            FileImages(tuple(f.path for f in found), size, grey),
            np.asarray([f.label for f in found], dtype=np.int64),
        )
        for name, found in parts.items()
    }
    train, test = (splits["train"], splits["test"]) if has_splits else _holdout(splits[""])
    log.info("found %d train / %d test images in %s", len(train), len(test), root)
    return DataSet(spec, train, test, classes)


def channel_stats(x: np.ndarray | Iterable[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 ``(N, C, H, W)`` images, on the
    [0, 1] scale: of one array, or of a stream of batches (a split read in order)."""
    chunks = [x] if isinstance(x, np.ndarray) else x
    total = squares = None
    count = 0
    for chunk in chunks:
        # float64 accumulation without a float64 copy of the chunk.
        s = chunk.sum(axis=(0, 2, 3), dtype=np.float64)
        q = np.einsum("nchw,nchw->c", chunk, chunk, dtype=np.float64)
        total, squares = (s, q) if total is None else (total + s, squares + q)
        count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    if total is None or squares is None or not count:
        raise DataSpecError("no images to take channel statistics of")
    mean = total / count / 255.0
    var = squares / count / 255.0**2 - mean * mean
    std = np.maximum(np.sqrt(np.maximum(var, 0.0)), 1e-3)
    return [float(m) for m in mean], [float(v) for v in std]


def split_stats(split: Split, workers: int | None = None) -> tuple[list[float], list[float]]:
    """:func:`channel_stats` of a split, read in order through its loader."""
    return channel_stats(batch.x.numpy() for batch in split.in_order(1024, workers))


def normalize(x: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """Turn uint8 ``(N, C, H, W)`` images into the float tensor the models take."""
    import torch

    # float32 conversion copies anyway; doing it in numpy also accepts read-only inputs.
    return normalize_tensor(torch.from_numpy(x.astype(np.float32)), mean, std)


def normalize_tensor(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """:func:`normalize` of an image tensor (uint8 or float), on the tensor's device."""
    import torch

    t = x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x.div(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return t.sub_(m).div_(s)
