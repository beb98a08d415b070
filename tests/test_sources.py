"""Sources: npz, image directories and JSON lines yield stable, numbered items; bad inputs are
item errors, not exceptions."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tandem.edge.sources import (
    ImageDirSource,
    Item,
    JsonlSource,
    NpzSource,
    SourceError,
    open_source,
)

MNIST = Path(__file__).resolve().parents[2] / "shared/data/mnist.npz"
LABELS = ["cat", "dog"]


@pytest.fixture(scope="module")
def npz_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """10,050 random 4x4 grey images: the last 10,000 are the test split."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10_050, 4, 4), dtype=np.uint8)
    y = rng.integers(0, 10, 10_050)
    path = tmp_path_factory.mktemp("npz") / "d.npz"
    np.savez(path, x=x, y=y)
    return path, x, y


def test_npz_test_split(npz_file: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, x, y = npz_file
    source = NpzSource(path, (1, 4, 4))
    assert source.key == f"npz:{path.resolve()}"
    assert source.has_labels and source.replayable and len(source) == 10_000
    items = list(source.iter_from(0))
    assert [it.index for it in items] == list(range(10_000))
    assert all(it.x is not None and it.x.shape == (1, 4, 4) for it in items)
    assert all(it.x is not None and it.x.dtype == np.uint8 for it in items)
    pixels = np.stack([it.x for it in items if it.x is not None])
    np.testing.assert_array_equal(pixels[:, 0], x[-10_000:])
    assert [it.label for it in items] == y[-10_000:].tolist()
    assert all(it.error is None for it in items)


def test_npz_start_and_limit(npz_file: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, x, y = npz_file
    source = NpzSource(path)
    assert [it.index for it in source.iter_from(9_997)] == [9_997, 9_998, 9_999]
    items = list(source.iter_from(5, limit=8))
    assert [it.index for it in items] == [5, 6, 7]
    assert items[0].x is not None
    np.testing.assert_array_equal(items[0].x[0], x[-10_000 + 5])
    assert items[0].label == y[-10_000 + 5]
    assert list(source.iter_from(8, limit=8)) == []
    assert list(source.iter_from(20_000)) == []


def test_npz_errors(npz_file: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="bundle takes"):
        NpzSource(npz_file[0], (3, 4, 4))
    with pytest.raises(SourceError, match="no such file"):
        NpzSource(tmp_path / "absent.npz")


@pytest.mark.skipif(not MNIST.is_file(), reason="shared MNIST not present")
def test_npz_mnist() -> None:
    source = open_source(f"npz:{MNIST}", (1, 28, 28), [str(i) for i in range(10)])
    count = 0
    for item in source.iter_from(0):
        assert item.x is not None and item.x.shape == (1, 28, 28) and item.label is not None
        count += 1
    assert count == 10_000


def _image(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _image_dir(root: Path) -> None:
    _image(root / "cat" / "b.PNG", (8, 6), (255, 0, 0))
    _image(root / "cat" / "a.jpg", (4, 4), (10, 10, 10))
    _image(root / "dog" / "deep" / "c.bmp", (4, 4), (0, 0, 255))  # parent is "deep": no label
    _image(root / "dog" / "d.gif", (4, 4), (0, 255, 0))
    _image(root / "top.webp", (4, 4), (1, 2, 3))
    (root / "dog" / "broken.png").write_bytes(b"not a png at all")
    (root / "notes.txt").write_text("not an image")
    _image(root / ".hidden" / "e.png", (4, 4), (0, 0, 0))
    _image(root / "cat" / ".f.png", (4, 4), (0, 0, 0))


def test_image_dir(tmp_path: Path) -> None:
    _image_dir(tmp_path)
    source = ImageDirSource(tmp_path, (3, 4, 5), LABELS)
    assert source.key == f"dir:{tmp_path.resolve()}"
    assert source.has_labels and source.replayable
    names = [p.relative_to(tmp_path).as_posix() for p in source.files]
    assert names == [
        "cat/a.jpg",
        "cat/b.PNG",
        "dog/broken.png",
        "dog/d.gif",
        "dog/deep/c.bmp",
        "top.webp",
    ]
    items = list(source.iter_from(0))
    assert [it.index for it in items] == list(range(6))
    assert [it.label for it in items] == [0, 0, 1, 1, None, None]
    broken = items[2]
    assert broken.x is None and broken.error is not None and "dog/broken.png" in broken.error
    for it in items[:2] + items[3:]:
        assert it.error is None and it.x is not None
        assert it.x.shape == (3, 4, 5) and it.x.dtype == np.uint8
    red = items[1].x
    assert red is not None
    assert (red[0] == 255).all() and (red[1:] == 0).all()  # resized, channels first
    assert [it.index for it in source.iter_from(4, limit=5)] == [4]


def test_image_dir_grey(tmp_path: Path) -> None:
    _image(tmp_path / "dog" / "x.png", (3, 2), (0, 255, 0))
    source = ImageDirSource(tmp_path, (1, 2, 3), LABELS)
    [item] = source.iter_from(0)
    expected = np.asarray(Image.new("RGB", (3, 2), (0, 255, 0)).convert("L"))
    assert item.x is not None and item.x.shape == (1, 2, 3) and item.label == 1
    np.testing.assert_array_equal(item.x[0], expected)


def test_image_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such directory"):
        ImageDirSource(tmp_path / "absent", (3, 4, 4), LABELS)
    with pytest.raises(SourceError, match="2-channel"):
        ImageDirSource(tmp_path, (2, 4, 4), LABELS)
    empty = ImageDirSource(tmp_path, (1, 4, 4), LABELS)
    assert len(empty) == 0 and not empty.has_labels and list(empty.iter_from(0)) == []


def _grid(value: int = 7, shape: tuple[int, ...] = (1, 2, 2)) -> list:
    return np.full(shape, value).tolist()


def _jsonl_lines() -> list[str]:
    return [
        json.dumps({"input": _grid(1), "label": 1}),  # 0: (C, H, W)
        json.dumps({"input": _grid(2, (2, 2))}),  # 1: (H, W) for one channel, no label
        "",  # 2: blank, skipped but counted
        '{"input": [[[1, 2], [3, 4]]',  # 3: malformed JSON
        json.dumps({"input": _grid(3, (1, 3, 2))}),  # 4: wrong shape
        json.dumps({"input": _grid(300)}),  # 5: out of range
        json.dumps({"input": 5}),  # 6: not a list
        json.dumps([1, 2, 3]),  # 7: not an object
        json.dumps({"input": [[[1, 2], [3]]]}),  # 8: ragged
        json.dumps({"input": [[[1.5, 2], [3, 4]]]}),  # 9: not integers
        json.dumps({"input": _grid(-1)}),  # 10: negative
        json.dumps({"input": _grid(4), "label": "cat"}),  # 11: bad label
        json.dumps({"label": 1}),  # 12: no input
        json.dumps({"input": _grid(255), "label": 0}),  # 13: fine
    ]


def _check_jsonl(items: list[Item], first: int = 0) -> None:
    assert [it.index - first for it in items] == [0, 1, *range(3, 14)]
    good = {0: 1, 1: 2, 13: 255}
    for it in items:
        n = it.index - first
        if n in good:
            assert it.error is None and it.x is not None, it.error
            assert it.x.shape == (1, 2, 2) and it.x.dtype == np.uint8
            assert (it.x == good[n]).all()
        else:
            assert it.x is None and it.error, n
    assert [it.label for it in items if it.index - first in good] == [1, None, 0]
    errors = {it.index - first: it.error for it in items}
    assert "malformed JSON" in str(errors[3])
    assert "shape" in str(errors[4]) and "0..255" in str(errors[5])
    assert "nested list" in str(errors[6]) and "JSON object" in str(errors[7])
    assert "label" in str(errors[11]) and "missing" in str(errors[12])


def test_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(_jsonl_lines()) + "\n")
    source = JsonlSource(path, (1, 2, 2))
    assert source.key == f"jsonl:{path.resolve()}" and source.replayable
    items = list(source.iter_from(0))
    _check_jsonl(items)
    assert "line 4:" in str(items[2].error)  # messages count lines from 1
    assert [it.index for it in source.iter_from(4, limit=7)] == [4, 5, 6]
    assert [it.index for it in source.iter_from(12)] == [12, 13]


def test_jsonl_invalid_utf8_and_label_range(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    good = json.dumps({"input": _grid(1), "label": 2}).encode()
    path.write_bytes(b'{"input": "\xff\xfe"}\n' + good + b"\n" + good)  # last line unterminated
    items = list(JsonlSource(path, (1, 2, 2), num_classes=2).iter_from(0))
    assert [it.index for it in items] == [0, 1, 2]
    assert all(it.x is None and it.error for it in items)
    assert "label" in str(items[1].error)
    items = list(JsonlSource(path, (1, 2, 2), num_classes=3).iter_from(1))
    assert [(it.index, it.label, it.error) for it in items] == [(1, 2, None), (2, 2, None)]


def test_jsonl_stream_numbers_from_start() -> None:
    data = "\n".join(_jsonl_lines()) + "\n"
    source = JsonlSource(io.BytesIO(data.encode()), (1, 2, 2))
    assert source.key == "stdin" and not source.replayable
    _check_jsonl(list(source.iter_from(100)), first=100)
    # The limit is a bound on the index, and is checked before reading a line.
    stream = io.StringIO(data)
    limited = list(JsonlSource(stream, (1, 2, 2)).iter_from(50, limit=52))
    assert [it.index for it in limited] == [50, 51]
    assert stream.readline() == "\n"  # line 2, the blank one, was not consumed


def test_jsonl_three_channels(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    lines = [{"input": _grid(9, (3, 2, 2))}, {"input": _grid(9, (2, 2))}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    first, second = JsonlSource(path, (3, 2, 2)).iter_from(0)
    assert first.x is not None and first.x.shape == (3, 2, 2)
    assert second.x is None and "shape" in str(second.error)  # (H, W) only for one channel


def test_open_source(
    tmp_path: Path, npz_file: tuple[Path, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    _image_dir(tmp_path / "imgs")
    (tmp_path / "in.jsonl").write_text(json.dumps({"input": _grid(1)}) + "\n")
    assert isinstance(open_source(f"npz:{npz_file[0]}", (1, 4, 4), LABELS), NpzSource)
    jsonl = open_source(f"jsonl:{tmp_path / 'in.jsonl'}", (1, 2, 2), LABELS)
    assert isinstance(jsonl, JsonlSource) and jsonl.replayable
    for spec in (f"dir:{tmp_path / 'imgs'}", str(tmp_path / "imgs")):
        source = open_source(spec, (3, 4, 4), LABELS)
        assert isinstance(source, ImageDirSource)
        assert source.key == f"dir:{(tmp_path / 'imgs').resolve()}"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    for spec in ("-", "jsonl:-"):
        stdin = open_source(spec, (1, 2, 2), LABELS)
        assert stdin.key == "stdin" and not stdin.replayable


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "unknown or missing source"),
        ("csv:data.csv", "unknown or missing source"),
        ("npz:", "unknown or missing source"),
        ("no/such/dir", "unknown or missing source"),
        ("npz:/no/such/file.npz", "no such file"),
        ("jsonl:/no/such/file.jsonl", "no such file"),
        ("dir:/no/such/dir", "no such directory"),
    ],
)
def test_open_source_errors(spec: str, match: str) -> None:
    with pytest.raises(SourceError, match=match) as info:
        open_source(spec, (1, 4, 4), LABELS)
    assert "\n" not in str(info.value)


def test_open_source_bad_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "odd.npz", x=np.zeros((5, 4, 4), np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(SourceError, match="5 images and 4 labels"):
        open_source(f"npz:{tmp_path / 'odd.npz'}", (1, 4, 4), LABELS)


def _image_folder(root: Path) -> Path:
    """train/ and test/ with one class folder each of 4x4 RGB PNGs (lossless: exact pixels)."""
    rng = np.random.default_rng(1)
    for split, count in (("train", 3), ("test", 4)):
        for name in LABELS:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_an_image_folder_spec_is_its_test_split_as_eval_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``imagefolder:DIR``, the spec ``train`` and ``eval`` take, is a source too: the test
    split with its labels, row for row as ``tandem eval`` reads it (across chunks)."""
    from tandem.data import load_data

    monkeypatch.setattr("tandem.edge.sources._CHUNK", 3)
    spec = f"imagefolder:{_image_folder(tmp_path / 'f')}"
    source = open_source(spec, (3, 4, 4), LABELS)
    assert source.has_labels and source.replayable and len(source) == 8  # type: ignore[attr-defined]
    test = load_data(spec).test
    items = list(source.iter_from(2, limit=6))
    assert [i.index for i in items] == [2, 3, 4, 5]
    for item in items:
        np.testing.assert_array_equal(item.x, test.take([item.index])[0])
        assert item.label == test.y[item.index]
    with pytest.raises(SourceError, match=r"inputs have shape \(3, 4, 4\)"):
        open_source(spec, (1, 4, 4), LABELS)


def test_an_image_folder_file_gone_after_opening_is_one_error_item(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One file that breaks after the source opened fails alone: its neighbours in the same
    chunk are still sent, and the daemon goes on (a stuck cursor would fail every restart)."""
    monkeypatch.setattr("tandem.edge.sources._CHUNK", 4)
    root = _image_folder(tmp_path / "f")
    source = open_source(f"imagefolder:{root}", (3, 4, 4), LABELS)
    (root / "test" / "cat" / "1.png").write_bytes(b"not an image any more")
    items = list(source.iter_from(0))
    assert [i.index for i in items] == list(range(8))
    broken = [i for i in items if i.error is not None]
    assert len(broken) == 1 and broken[0].x is None and "1.png" in broken[0].error
    assert all(i.x is not None for i in items if i.error is None)


def test_an_image_folder_with_other_classes_than_the_bundle_is_refused(tmp_path: Path) -> None:
    """Labels are class indices: a folder whose classes differ from the bundle's would score
    every answer against the wrong class, so it is refused up front."""
    spec = f"imagefolder:{_image_folder(tmp_path / 'f')}"
    with pytest.raises(SourceError, match=r"classes \['cat', 'dog'\].*\['dog', 'cat'\]"):
        open_source(spec, (3, 4, 4), ["dog", "cat"])
