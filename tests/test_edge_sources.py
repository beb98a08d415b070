"""An image directory read by the edge daemon: only regular files are read, and an image far
larger than the bundle's input is refused from its header instead of being decoded."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from tandem.edge.sources import MIN_PIXEL_CAP, PIXEL_FACTOR, ImageDirSource, Item


def _items_within(source: ImageDirSource, seconds: float, unblock: Path) -> list[Item]:
    """Every item of ``source``, read on a thread; fails (and unblocks a reader stuck in
    ``unblock``, a FIFO) if that takes longer than ``seconds``."""
    items: list[Item] = []
    reader = threading.Thread(target=lambda: items.extend(source.iter_from(0)), daemon=True)
    reader.start()
    reader.join(seconds)
    if reader.is_alive():
        os.close(os.open(unblock, os.O_RDWR))  # a writer appears and goes: the read ends
        reader.join(seconds)
        pytest.fail(f"reading the source blocked on {unblock}")
    return items


def test_a_fifo_named_like_an_image_is_an_error_item_not_a_hang(tmp_path: Path) -> None:
    for name in ("a.png", "c.png"):
        Image.new("L", (8, 8), 7).save(tmp_path / name)
    fifo = tmp_path / "b.png"
    os.mkfifo(fifo)
    source = ImageDirSource(tmp_path, (1, 8, 8), [])
    items = _items_within(source, 30, fifo)
    assert [i.index for i in items] == [0, 1, 2]
    assert items[0].error is None and items[2].error is None
    assert items[1].x is None and items[1].error is not None
    assert "not a regular file" in items[1].error and "b.png" in items[1].error


def test_an_image_far_above_the_input_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shape = (1, 8, 8)
    cap = max(PIXEL_FACTOR * 8 * 8, MIN_PIXEL_CAP)
    side = int(np.ceil(np.sqrt(cap))) + 1  # just above the cap
    Image.new("L", (side, side)).save(tmp_path / "big.png")
    Image.new("L", (64, 64), 9).save(tmp_path / "ok.png")

    decoded: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> object:
        decoded.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    items = list(ImageDirSource(tmp_path, shape, []).iter_from(0))
    big, ok = items
    assert big.x is None and big.error is not None and "too large" in big.error
    assert ok.error is None and ok.x is not None and ok.x.shape == shape
    assert all(w * h <= cap for w, h in decoded), f"decoded {decoded}"
