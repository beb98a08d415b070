"""Input sources for the edge daemon: where the inputs come from, one numbered item at a time.

A source is named by a spec (see :func:`open_source`) and yields :class:`Item` objects with a
stable ``index``. The daemon stores, per source ``key``, the next index it has not yet accepted
(``edge.spool``); after a restart it calls ``iter_from(cursor)`` and so neither skips nor repeats
an input. That only works if the same key always yields the same inputs at the same indices:

- ``digits`` is the test split of the shipped digits set; ``imagefolder:DIR`` the test split
  of an image folder (``DIR/test/<class>/``), as ``tandem train`` and ``eval`` read it.
- ``npz:PATH`` and ``jsonl:PATH`` are files the daemon only reads; replace them and the cursor
  points into different data.
- ``dir:PATH`` numbers the image files in sorted order of their relative paths, listed when the
  source is opened. New files that sort after the existing ones get new indices; adding or
  removing files in the middle of the order shifts the indices of those after it.
- stdin cannot be replayed: a restarted daemon reads a new stream. It numbers its lines from the
  ``start`` it is given, so that the new stream's inputs continue after the old one's instead of
  colliding with the indices of inputs still pending in the spool.

A single input that cannot be read (a corrupt image, a malformed JSON line) becomes an item with
``error`` set, never an exception: one bad input must not stop the daemon.

``limit`` (``iter_from(start, limit)``) caps the index range: only indices below ``limit`` are
yielded, so ``--limit N`` means the first N inputs in total, across restarts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from tandem.data import IMAGE_SUFFIXES, DataSpecError, load_data
from tandem.files import open_regular

__all__ = [
    "HeldOutSource",
    "ImageDirSource",
    "Item",
    "JsonlSource",
    "NpzSource",
    "Source",
    "SourceError",
    "open_source",
]

#: What an image directory is searched for (case-insensitive): tandem.data's training suffixes
#: plus the other formats a camera or a browser commonly saves.
DIR_SUFFIXES = frozenset(IMAGE_SUFFIXES | {".bmp", ".gif", ".webp"})

#: An image with more pixels than ``max(PIXEL_FACTOR * H * W, MIN_PIXEL_CAP)`` for a bundle
#: taking (C, H, W) inputs is refused from its header, before anything is decoded: decoding
#: costs memory in its pixels, whatever the file's size (a 140 KB PNG can hold 144 Mpx). The
#: floor keeps a camera's photo (12 Mpx) usable for a bundle of tiny inputs.
PIXEL_FACTOR = 64
MIN_PIXEL_CAP = 4096 * 4096
_CHUNK = 256  # test-split rows read at once: one read per chunk, a bounded few MB held

#: PIL mode for each supported channel count of the bundle's input.
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class SourceError(ValueError):
    """A source spec could not be parsed, or its source cannot be opened as a whole."""


@dataclass(frozen=True)
class Item:
    """One input: ``x`` is uint8 ``(C, H, W)``, or None with ``error`` saying why it is missing."""

    index: int
    x: np.ndarray | None
    label: int | None
    error: str | None = None


class Source(Protocol):
    """What the daemon reads inputs from (see the module docstring for the guarantees)."""

    @property
    def key(self) -> str:
        """A stable identity, e.g. ``npz:/abs/path``: the spool keeps one cursor per key."""
        ...

    @property
    def has_labels(self) -> bool:
        """Whether items can carry ground-truth labels (each ``Item.label`` says if it does)."""
        ...

    @property
    def replayable(self) -> bool:
        """Whether ``iter_from(start)`` can go back to an earlier index (stdin cannot)."""
        ...

    def iter_from(self, start: int, limit: int | None = None) -> Iterator[Item]:
        """Items with ``start <= index < limit`` (no upper bound if ``limit`` is None)."""
        ...


class HeldOutSource:
    """The test split of a data spec (``digits``, ``npz:PATH``, ``imagefolder:DIR``), with
    labels, keyed by the spec.

    Loaded through :func:`tandem.data.load_data`, so the rows (the held-out split that
    ``tandem.data`` defines) and the ``(C, H, W)`` layout are exactly those the bundle was
    evaluated on. An image folder's files are read as the daemon reaches them, a chunk at a
    time, never all at once; a file that breaks after opening is an error item, alone. If
    ``input_shape`` is given, a mismatch is a :class:`SourceError` up front rather than one
    failed request per input; so is, given ``labels``, a set of classes other than the
    bundle's (labels are class indices: they would score every answer against another class).
    """

    has_labels = True
    replayable = True

    def __init__(
        self,
        spec: str,
        input_shape: Sequence[int] | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        self.key = spec
        try:
            data = load_data(spec)
        except DataSpecError as exc:
            raise SourceError(str(exc)) from exc
        shape = tuple(int(d) for d in data.test.shape)
        if input_shape is not None and shape != tuple(input_shape):
            raise SourceError(
                f"{self.key}: inputs have shape {shape}, the bundle takes {tuple(input_shape)}"
            )
        if labels is not None and list(labels) != data.classes:
            raise SourceError(
                f"{self.key}: classes {data.classes}, the bundle's are {list(labels)}"
            )
        self._test = data.test

    def __len__(self) -> int:
        """The number of inputs: the test split's rows."""
        return len(self._test)

    def iter_from(self, start: int, limit: int | None = None) -> Iterator[Item]:
        """Rows ``start`` up to ``limit`` (or the end) of the test split."""
        stop = len(self) if limit is None else min(len(self), limit)
        for first in range(max(0, start), stop, _CHUNK):
            yield from self._chunk(np.arange(first, min(first + _CHUNK, stop)))

    def _chunk(self, rows: np.ndarray) -> Iterator[Item]:
        """Items for ``rows``: read at once, or, when one fails, one by one."""
        try:
            images = self._test.take(rows)
        except DataSpecError:
            yield from (self._one(int(i)) for i in rows)
            return
        for i, x in zip(rows, images, strict=True):
            yield Item(int(i), x, int(self._test.y[i]))

    def _one(self, i: int) -> Item:
        try:
            return Item(i, self._test.take([i])[0], int(self._test.y[i]))
        except DataSpecError as exc:
            return Item(i, None, int(self._test.y[i]), str(exc))


class NpzSource(HeldOutSource):
    """The test split of ``npz:PATH`` (the last 10,000 rows of a larger archive, a seeded 20%
    of a smaller one), keyed by the file's absolute path."""

    def __init__(self, path: Path | str, input_shape: Sequence[int] | None = None) -> None:
        self.path = Path(path).expanduser().resolve()
        super().__init__(f"npz:{self.path}", input_shape)


class ImageDirSource:
    """Image files under a directory, found recursively and numbered in sorted path order.

    Each image is converted to the bundle's channels (C=1: grey "L", C=3: "RGB") and resized to
    its (H, W) with bilinear filtering, as ``tandem.data`` resizes an image folder for training.
    A file whose parent directory (below ``path``) is named after one of ``labels`` gets that
    class as its label; files directly in ``path``, or under other names, have none. Hidden files
    and directories (a leading dot) are skipped: they are editor and OS droppings such as macOS
    ``._name.jpg`` files, not inputs.
    """

    replayable = True

    def __init__(self, path: Path | str, input_shape: Sequence[int], labels: Sequence[str]) -> None:
        self.path = Path(path).expanduser().resolve()
        self.key = f"dir:{self.path}"
        if not self.path.is_dir():
            raise SourceError(f"{self.key}: no such directory")
        c, self._h, self._w = _shape3(input_shape)
        if c not in _MODES:
            raise SourceError(f"{self.key}: cannot make {c}-channel inputs from images")
        self._mode = _MODES[c]
        self._max_pixels = max(PIXEL_FACTOR * self._h * self._w, MIN_PIXEL_CAP)
        classes = {name: i for i, name in enumerate(labels)}
        found = []
        # os.walk, not rglob: it does not follow symlinked directories, so a link cycle cannot
        # make the listing endless.
        for folder, dirs, names in os.walk(self.path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                p = Path(folder) / name
                if name.startswith(".") or p.suffix.lower() not in DIR_SUFFIXES:
                    continue
                rel = p.relative_to(self.path)
                label = classes.get(rel.parent.name) if len(rel.parts) > 1 else None
                found.append((rel.parts, p, label))
        # Sorted by path components, not by the whole string: "a/b.png" stays next to "a/c.png"
        # whatever characters sort between "/" and the letters.
        found.sort(key=lambda f: f[0])
        self.files: list[Path] = [p for _, p, _ in found]
        self._labels: list[int | None] = [label for _, _, label in found]
        self.has_labels = any(label is not None for label in self._labels)

    def __len__(self) -> int:
        """The number of image files found when the source was opened."""
        return len(self.files)

    def iter_from(self, start: int, limit: int | None = None) -> Iterator[Item]:
        """Files ``start`` up to ``limit`` (or the last), read and converted one at a time."""
        stop = len(self) if limit is None else min(len(self), limit)
        for i in range(max(0, start), stop):
            x, error = self._read(self.files[i])
            yield Item(i, x, self._labels[i], error)

    def _read(self, path: Path) -> tuple[np.ndarray | None, str | None]:
        from PIL import Image

        try:
            # Only regular files: a FIFO named *.png would block this index on every run.
            with open_regular(path) as fh, Image.open(fh) as opened:
                # The header gives the size: refuse before decoding a single pixel.
                w, h = opened.size
                if w * h > self._max_pixels:
                    raise ValueError(
                        f"{w}x{h} is too large for this bundle's {self._w}x{self._h} inputs "
                        f"(at most {self._max_pixels} pixels)"
                    )
                img = opened.convert(self._mode)
            if img.size != (self._w, self._h):
                img = img.resize((self._w, self._h), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)
        # PIL reports a bad file with many exception types (OSError, SyntaxError, ValueError,
        # DecompressionBombError, ...); the file may also vanish after listing. All of them
        # mean "this input cannot be read", which is an item error, not a daemon crash.
        except Exception as exc:
            rel = path.relative_to(self.path)
            return None, f"cannot read image {rel}: {type(exc).__name__}: {exc}"
        if pixels.ndim == 2:
            return pixels[None, :, :].copy(), None
        return np.ascontiguousarray(pixels.transpose(2, 0, 1)), None


class JsonlSource:
    """JSON lines ``{"input": [...], "label": 3}`` from a file or a stream.

    ``input`` is a nested list of integers 0..255 of shape ``(C, H, W)``, or ``(H, W)`` when the
    bundle takes one channel; ``label`` is optional. The index of an item is its 0-based line
    number: blank lines yield nothing but are counted, so indices stay line numbers. A line that
    is not such an object (malformed JSON, a wrong shape, a value out of range, ...) yields an
    item with ``error`` set.

    From a path the source is replayable and keyed ``jsonl:/abs/path``. From a stream (stdin)
    it is not: ``iter_from(start)`` reads the stream from its current position and numbers its
    lines from ``start`` (see the module docstring); it can be iterated once.
    """

    has_labels = True

    def __init__(
        self,
        source: Path | str | Iterable[str] | Iterable[bytes],
        input_shape: Sequence[int],
        *,
        num_classes: int | None = None,
        key: str | None = None,
    ) -> None:
        self._shape = _shape3(input_shape)
        self._num_classes = num_classes
        self._stream: Iterable[str | bytes] | None
        if isinstance(source, str | Path):
            self.path: Path | None = Path(source).expanduser().resolve()
            if self.path.is_fifo():  # a named pipe is a stream: read once, opened when read
                self._stream = _lines_of(self.path)
                self.key = key or f"jsonl:{self.path}"
                self.replayable = False
                return
            if not self.path.is_file():
                raise SourceError(f"jsonl:{self.path}: no such file")
            self._stream = None
            self.key = key or f"jsonl:{self.path}"
            self.replayable = True
        else:
            self.path = None
            self._stream = source
            self.key = key or "stdin"
            self.replayable = False

    def iter_from(self, start: int, limit: int | None = None) -> Iterator[Item]:
        """Items from line ``start`` (file) or numbered from ``start`` (stream), below ``limit``."""
        if self._stream is not None:
            lines = iter(self._stream)
            index = start
            # The limit is checked before reading: on stdin a read blocks until the next line.
            while limit is None or index < limit:
                line = next(lines, None)
                if line is None:
                    return
                item = self._parse(index, index - start + 1, line)
                if item is not None:
                    yield item
                index += 1
            return
        assert self.path is not None
        with self.path.open("rb") as fh:
            for index, line in enumerate(fh):
                if limit is not None and index >= limit:
                    return
                if index >= start:
                    item = self._parse(index, index + 1, line)
                    if item is not None:
                        yield item

    def _parse(self, index: int, lineno: int, line: str | bytes) -> Item | None:
        """The item on line ``lineno`` (1-based, for messages); None for a blank line."""
        if not line.strip():
            return None
        try:
            obj = json.loads(line)
        # RecursionError: absurdly deep nesting. UnicodeDecodeError is a ValueError.
        except (ValueError, RecursionError) as exc:
            return Item(index, None, None, f"line {lineno}: malformed JSON: {exc}")
        if not isinstance(obj, dict):
            return Item(index, None, None, f"line {lineno}: expected a JSON object")
        label = obj.get("label")
        if label is not None and (
            isinstance(label, bool)
            or not isinstance(label, int)
            or label < 0
            or (self._num_classes is not None and label >= self._num_classes)
        ):
            return Item(index, None, None, f"line {lineno}: invalid label {label!r}")
        x, error = self._pixels(obj.get("input"))
        if error is not None:
            return Item(index, None, label, f"line {lineno}: {error}")
        return Item(index, x, label)

    def _pixels(self, value: object) -> tuple[np.ndarray | None, str | None]:
        """``value`` as a uint8 (C, H, W) array, or why it is not one."""
        if value is None:
            return None, "missing 'input'"
        if not isinstance(value, list):
            return None, f"'input' must be a nested list, got {type(value).__name__}"
        try:
            arr = np.asarray(value)
        # Ragged lists, or nesting deeper than NumPy allows.
        except (ValueError, TypeError, RecursionError):
            return None, f"'input' must be a regular nested list of shape {self._shape}"
        # Floats, bools, strings and ints too large for int64 (dtype object) are all refused:
        # a value that is not an exact pixel intensity is a caller bug worth reporting.
        if arr.dtype.kind not in "iu":
            return None, f"'input' must hold integers 0..255, got {arr.dtype.kind!r} values"
        c, h, w = self._shape
        if c == 1 and arr.shape == (h, w):
            arr = arr[None, :, :]
        if arr.shape != self._shape:
            return None, f"'input' has shape {arr.shape}, expected {self._shape}"
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            return None, "'input' values must be in 0..255"
        return arr.astype(np.uint8), None


def _lines_of(path: Path) -> Iterator[bytes]:
    # Opening a named pipe blocks until a writer appears: do it on first read, on the
    # daemon's reader thread, not when the source is set up.
    with path.open("rb") as fh:
        yield from fh


def _shape3(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(int(d) <= 0 for d in shape):
        raise SourceError(f"input shape must be (C, H, W), got {tuple(shape)}")
    c, h, w = (int(d) for d in shape)
    return c, h, w


def open_source(spec: str, input_shape: Sequence[int], labels: Sequence[str]) -> Source:
    """The source named by ``spec``, for a bundle with ``input_shape`` and class ``labels``.

    Specs: ``digits``, ``npz:PATH`` or ``imagefolder:DIR`` (the test split), ``jsonl:PATH``,
    ``-`` or ``jsonl:-`` (JSON lines on stdin), ``dir:PATH`` or the path of an existing
    directory (image files). Raises :class:`SourceError` with a one-line message for anything
    else, or a missing path.
    """
    kind, sep, arg = spec.partition(":")
    if spec in ("-", "jsonl:-"):
        # The binary buffer: a line that is not valid UTF-8 becomes an item error in _parse,
        # where the text wrapper would raise out of the iteration and stop the daemon.
        return JsonlSource(
            # A file object of our own on fd 0: the reader thread may still be blocked in a
            # read at exit, and sys.stdin's lock would then abort the interpreter.
            os.fdopen(os.dup(0), "rb"),
            input_shape,
            num_classes=len(labels) or None,
            key="stdin",
        )
    if spec == "digits":
        return HeldOutSource(spec, input_shape)
    if sep and arg:
        if kind == "npz":
            return NpzSource(arg, input_shape)
        if kind == "imagefolder":
            spec = f"imagefolder:{Path(arg).expanduser().resolve()}"
            return HeldOutSource(spec, input_shape, labels)
        if kind == "jsonl":
            return JsonlSource(arg, input_shape, num_classes=len(labels) or None)
        if kind == "dir":
            return ImageDirSource(arg, input_shape, labels)
    if spec and Path(spec).expanduser().is_dir():
        return ImageDirSource(spec, input_shape, labels)
    raise SourceError(
        f"unknown or missing source {spec!r}: expected digits, npz:PATH, imagefolder:DIR, "
        "jsonl:PATH, dir:PATH, an existing directory, or - for JSON lines on stdin"
    )
