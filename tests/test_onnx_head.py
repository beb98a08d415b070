"""The head exported to ONNX and run by ONNX Runtime: the same payloads as PyTorch's head,
a daemon that serves with PyTorch unimportable, and refusals of a stale or altered export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serving import make_repo, server_process

from tandem.bundle import BundleError, HeadRunner, TailRunner
from tandem.cli import main
from tandem.data import load_data
from tandem.onnx_export import export_onnx
from tandem.onnx_head import INDEX_FILE, ONNX_DIR, OnnxHead

# Runs tandem's command line with every `import torch` failing, then lists any heavy module
# that was imported anyway.
NO_TORCH = """
import json, sys
sys.modules["torch"] = None
from tandem.cli import main
status = main(sys.argv[1:])
heavy = [m for m in sys.modules if sys.modules[m] is not None
         and (m.split(".")[0] in {"torch", "flwr", "onnx"} or m == "safetensors.torch")]
print(json.dumps({"heavy": heavy}), file=sys.stderr)
sys.exit(status)
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, digits_entropy_bundle: Path) -> Path:
    """A copy of the digits bundle with rate points, its head exported to ONNX."""
    bundle = tmp_path_factory.mktemp("onnx") / "digits"
    shutil.copytree(digits_entropy_bundle, bundle, ignore=shutil.ignore_patterns("checkpoint"))
    export_onnx(bundle)
    return bundle


def _pairs(head: HeadRunner) -> list[tuple[float, int | None, int | None]]:
    """Every (width, bits, point) the bundle can send at."""
    widths = head.manifest.bottleneck.widths
    return [(w, b, None) for w in widths for b in (2, 4, 8)] + [
        (w, None, p) for w in widths for p in range(len(head.points))
    ]


def _payloads(
    head: Any, x: np.ndarray, width: float, bits: int | None, point: int | None
) -> list[bytes]:
    return head.encode(x, width, bits) if point is None else head.encode_entropy(x, width, point)


def test_onnx_payloads_match_the_torch_heads_and_classify_the_same(exported: Path) -> None:
    """Every width and codec, on all 1,797 digits images: the tail's predictions from ONNX
    payloads equal those from PyTorch payloads, features agree to 1e-5, and payloads are the
    same bytes: at least 99.9% of them at 2 and 4 bits and at the rate points.

    Not all: ONNX Runtime's convolutions round differently (about 1e-7). A group's
    parameters move only if one of its bounds lies that close to a point of the codec's
    grid; a symbol, if its value lies that close to a rounding edge, whose odds grow with
    the values per payload over the step, so 8 bits (a step 17 times finer than 4 bits')
    is held to 99% (bench/head.py measures them all)."""
    torch_head, onnx_head = HeadRunner.from_bundle(exported), OnnxHead.from_bundle(exported)
    tail = TailRunner.from_bundle(exported)
    digits = load_data("digits")
    x = np.concatenate([digits.train.x, digits.test.x])
    same: dict[str, list[bool]] = {"2, 4 bits": [], "8 bits": [], "rate points": []}
    for width, bits, point in _pairs(torch_head):
        ours = _payloads(onnx_head, x, width, bits, point)
        theirs = _payloads(torch_head, x, width, bits, point)
        kind = "rate points" if bits is None else "8 bits" if bits == 8 else "2, 4 bits"
        same[kind] += [a == b for a, b in zip(ours, theirs, strict=True)]
        assert np.array_equal(
            tail.infer(ours, width).argmax(1), tail.infer(theirs, width).argmax(1)
        ), (width, bits, point)
        np.testing.assert_allclose(
            onnx_head.features(x, width), torch_head.features(x, width), rtol=0, atol=1e-5
        )
    floor = {"2, 4 bits": 0.999, "8 bits": 0.99, "rate points": 0.999}
    for kind, flags in same.items():
        assert np.mean(flags) >= floor[kind], f"{kind}: {sum(flags)} of {len(flags)} identical"


def test_the_export_is_described_and_checked(exported: Path) -> None:
    index = json.loads((exported / ONNX_DIR / INDEX_FILE).read_text())
    head = HeadRunner.from_bundle(exported)
    assert index["bundle_version"] == head.manifest.version
    assert set(index["heads"]) == {str(w) for w in head.manifest.bottleneck.widths}
    assert all(h["max_abs_diff"] < 1e-5 for h in index["heads"].values())


@pytest.mark.slow
def test_a_daemon_without_torch_serves_what_the_torch_head_serves(
    exported: Path, tmp_path: Path
) -> None:
    test = load_data("digits").test
    repo = make_repo(tmp_path, exported)
    sink = tmp_path / "out.jsonl"
    with server_process("--models", str(repo), "--listen", "127.0.0.1:0") as (_, ready):
        done = subprocess.run(
            [sys.executable, "-c", NO_TORCH, "edge", "run", "--json", "--bundle", str(exported),
             "--cloud", ready["address"], "--source", "digits", "--sink", str(sink),
             "--runtime", "onnx", "--width", "0.5", "--bits", "4"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stderr.strip().splitlines()[-1]) == {"heavy": []}
    summary = json.loads(done.stdout)
    assert summary["served"] == len(test) and summary["served_locally"] == 0
    records = sorted((json.loads(line) for line in sink.read_text().splitlines()),
                     key=lambda r: r["input_index"])  # fmt: skip
    payloads = HeadRunner.from_bundle(exported).encode(test.x, 0.5, 4)
    expected = TailRunner.from_bundle(exported).infer(payloads, 0.5).argmax(1)
    assert [r["prediction"] for r in records] == expected.tolist()


def test_no_export_is_one_line_saying_how_to_make_one(
    digits_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sink = str(tmp_path / "o.jsonl")
    argv = ["edge", "run", "--bundle", str(digits_bundle), "--cloud", "127.0.0.1:1",
            "--source", "digits", "--sink", sink, "--runtime", "onnx"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tandem export" in err and "--onnx" in err


def test_a_stale_or_altered_export_is_refused(exported: Path, tmp_path: Path) -> None:
    stale = tmp_path / "stale"
    shutil.copytree(exported, stale)
    index_path = stale / ONNX_DIR / INDEX_FILE
    index = json.loads(index_path.read_text())
    index["bundle_version"] = "0123456789ab"
    index_path.write_text(json.dumps(index))
    with pytest.raises(BundleError, match="exported from bundle version '0123456789ab'"):
        OnnxHead.from_bundle(stale)

    altered = tmp_path / "altered"
    shutil.copytree(exported, altered)
    onnx_file = altered / ONNX_DIR / next(iter(index["heads"].values()))["file"]
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 1
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        OnnxHead.from_bundle(altered)


def test_a_failed_export_leaves_the_previous_one_whole(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tandem.onnx_export

    copy = tmp_path / "b"
    shutil.copytree(exported, copy)
    before = {p.name: p.read_bytes() for p in (copy / ONNX_DIR).iterdir()}
    monkeypatch.setattr(tandem.onnx_export, "_largest_difference", lambda *a: float("nan"))
    with pytest.raises(RuntimeError, match="differs from PyTorch by nan"):
        export_onnx(copy)
    after = {p.name: p.read_bytes() for p in (copy / ONNX_DIR).iterdir() if p.suffix != ".tmp"}
    assert after == before
    OnnxHead.from_bundle(copy)  # the old export still loads


def test_a_head_adapter_with_the_onnx_runtime_is_refused_at_once(tmp_path: Path) -> None:
    from tandem.edge.config import DaemonConfig

    fields = {"bundle": tmp_path, "cloud": "127.0.0.1:1", "source": "digits",
              "runtime": "onnx", "head_adapter": tmp_path}  # fmt: skip
    with pytest.raises(ValueError, match="head adapter is merged by PyTorch"):
        DaemonConfig.model_validate(fields)


def test_export_json_is_one_document(
    exported: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    copy = tmp_path / "b"
    shutil.copytree(exported, copy)
    assert main(["export", str(copy), "--onnx", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["bundle"] == str(copy) and set(doc["heads"]) == {"0.25", "0.5", "0.75", "1.0"}


def test_the_torch_runtime_without_torch_says_what_to_do_in_one_line(
    digits_bundle: Path, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, "edge", "run", "--bundle", str(digits_bundle),
         "--cloud", "127.0.0.1:1", "--source", "digits", "--sink", str(tmp_path / "o.jsonl")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[0]
    assert "pip install 'tandem[train]'" in line and "--runtime onnx" in line
