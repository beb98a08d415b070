"""Image folders stream: read on demand through torch.utils.data workers, never held whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tandem.data import (
    ArrayImages,
    DataSpecError,
    FileImages,
    channel_stats,
    load_data,
    split_stats,
)


def _folder(root: Path, per_class: int, size: int = 32, classes: int = 2) -> Path:
    """A train/test image folder of random JPEGs: ``per_class`` train images per class."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 20)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def test_a_folder_is_read_on_demand_in_the_order_asked(tmp_path: Path) -> None:
    data = load_data(f"imagefolder:{_folder(tmp_path, 30)}")
    assert isinstance(data.train.images, FileImages)
    order = [torch.tensor([5, 0, 59]), torch.tensor([7, 3])]
    for workers in (0, 2):
        batches = list(data.train.batches(order, workers=workers))
        assert [b.idx.tolist() for b in batches] == [[5, 0, 59], [7, 3]]
        for b in batches:
            np.testing.assert_array_equal(b.x.numpy(), data.train.take(b.idx.numpy()))
            np.testing.assert_array_equal(b.y.numpy(), data.train.y[b.idx.numpy()])
    assert batches[0].y.tolist() == [0, 0, 1]


def test_reading_in_workers_gives_the_whole_split(tmp_path: Path) -> None:
    data = load_data(f"imagefolder:{_folder(tmp_path, 30)}")
    whole = data.train.in_memory(workers=2).x
    assert whole.shape == (60, 3, 32, 32) and whole.dtype == np.uint8
    # Streamed statistics equal those of the array read whole.
    assert split_stats(data.train, workers=2) == channel_stats(whole)


def test_arrays_stream_too_with_the_same_rows(tmp_path: Path) -> None:
    data = load_data("digits")
    assert isinstance(data.train.images, ArrayImages)
    (batch,) = data.train.batches([torch.tensor([3, 1])])
    np.testing.assert_array_equal(batch.x.numpy(), data.train.x[[3, 1]])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_broken_after_loading_is_one_line_naming_it(tmp_path: Path, workers: int) -> None:
    data = load_data(f"imagefolder:{_folder(tmp_path, 4)}")
    assert isinstance(data.train.images, FileImages)
    broken = data.train.images.paths[2]
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.raises(DataSpecError) as caught:
        list(data.train.in_order(3, workers=workers))
    message = str(caught.value)
    assert "\n" not in message and str(broken) in message and "changed on disk" in message


# Runs `tandem train` and reports the process's peak resident memory (its workers apart).
_PEAK_RSS = textwrap.dedent(
    """
    import resource, sys
    from tandem.cli import main
    code = main(sys.argv[1:])
    print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    sys.exit(code)
    """
)

_RECIPE = textwrap.dedent(
    """
    name = "stream-check"
    cut = "layer2"
    eval_bits = [4]
    [teacher]
    arch = { name = "resnet18", args = { width = 0.125 } }
    augment_shift = 4
    augment_fill = "black"
    augment_flip = true
    [teacher.train]
    epochs = 1
    batch_size = 256
    lr = 1e-3
    [bottleneck]
    channels = 4
    widths = [0.5, 1.0]
    encoder = [[8, 2], [8, 2], [16, 2]]
    decoder = []
    [distill]
    quant_bits = [4]
    [distill.head]
    epochs = 1
    batch_size = 256
    lr = 1e-3
    [distill.finetune]
    epochs = 0
    lr = 1e-3
    """
)


def _peak_rss_mb(tmp_path: Path, folder: Path, name: str) -> float:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(_RECIPE)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-c", _PEAK_RSS, "train", str(recipe), "--data",
           f"imagefolder:{folder}", "--out", str(tmp_path / name), "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert json.loads(lines[0])["points"]  # it trained, and measured its points
    return int(lines[-1].split()[1]) / 1024


def test_training_on_20000_images_holds_them_on_disk(tmp_path: Path) -> None:
    """One epoch over 20,000 images costs under 300 MB more memory than over 200. Held in
    memory as before, the images alone would take 61 MB as uint8 and 245 MB as floats."""
    small = _peak_rss_mb(tmp_path, _folder(tmp_path / "small", 100), "s")
    large = _peak_rss_mb(tmp_path, _folder(tmp_path / "large", 10_000), "l")
    assert large - small < 300, f"peak RSS {small:.0f} MB on 200 images, {large:.0f} on 20,000"
