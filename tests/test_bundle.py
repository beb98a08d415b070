"""Bundles: hashes are checked, each side loads only its own weights, answers match."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from tandem import codec
from tandem.bundle import (
    BundleError,
    HeadRunner,
    TailRunner,
    load_full,
    read_manifest,
)
from tandem.data import load_data


@pytest.fixture()
def bundle_copy(tmp_path: Path, digits_bundle: Path) -> Path:
    return Path(
        shutil.copytree(digits_bundle, tmp_path / "b", ignore=shutil.ignore_patterns("checkpoint"))
    )


def test_layout_and_no_pickle(digits_bundle: Path) -> None:
    manifest = read_manifest(digits_bundle)
    assert set(manifest.files) == {"head.safetensors", "tail.safetensors", "full.safetensors"}
    assert not list(digits_bundle.glob("*.pt")) and not list(digits_bundle.glob("*.pkl"))
    assert manifest.bottleneck.shapes["0.25"] == (2, 4, 4)


def test_head_side_never_needs_tail_weights(bundle_copy: Path) -> None:
    (bundle_copy / "tail.safetensors").unlink()
    (bundle_copy / "full.safetensors").unlink()
    head = HeadRunner.from_bundle(bundle_copy)
    payloads = head.encode(load_data("digits").test.x[:4], 0.5, 4)
    assert len(payloads) == 4 and all(isinstance(p, bytes) for p in payloads)
    with pytest.raises(BundleError, match="missing"):
        TailRunner.from_bundle(bundle_copy)


def test_tail_side_never_needs_head_weights(bundle_copy: Path, digits_bundle: Path) -> None:
    x = load_data("digits").test.x[:8]
    payloads = HeadRunner.from_bundle(digits_bundle).encode(x, 1.0, 8)
    (bundle_copy / "head.safetensors").unlink()
    logits = TailRunner.from_bundle(bundle_copy).infer(payloads)
    assert logits.shape == (8, 10)


@pytest.mark.parametrize("name", ["head.safetensors", "tail.safetensors", "full.safetensors"])
def test_tampering_is_detected(bundle_copy: Path, name: str) -> None:
    path = bundle_copy / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    loader = {
        "head.safetensors": HeadRunner.from_bundle,
        "tail.safetensors": TailRunner.from_bundle,
        "full.safetensors": load_full,
    }[name]
    with pytest.raises(BundleError, match="sha256"):
        loader(bundle_copy)


def test_invalid_manifest(bundle_copy: Path, tmp_path: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="invalid"):
        read_manifest(bundle_copy)
    with pytest.raises(BundleError, match="not a bundle"):
        read_manifest(tmp_path / "nowhere")


def test_runners_reject_bad_inputs(digits_bundle: Path) -> None:
    head, tail = HeadRunner.from_bundle(digits_bundle), TailRunner.from_bundle(digits_bundle)
    with pytest.raises(ValueError, match="uint8"):
        head.encode(np.zeros((2, 1, 8, 8), np.float32), 1.0)
    with pytest.raises(ValueError, match="not trained"):
        head.encode(np.zeros((2, 1, 8, 8), np.uint8), 0.3)
    with pytest.raises(ValueError, match="not among"):
        tail.infer([codec.encode(np.zeros((3, 4, 4), np.float32), 8)])
    valid = codec.encode(np.ones((8, 4, 4), np.float32), 16, compress=False)
    poisoned = valid[:-2] + np.array([np.nan], np.float16).tobytes()
    with pytest.raises(codec.CodecError, match="non-finite"):
        tail.infer([poisoned])


def test_split_runners_reproduce_the_table(digits_bundle: Path) -> None:
    manifest = read_manifest(digits_bundle)
    head, tail = HeadRunner.from_bundle(digits_bundle), TailRunner.from_bundle(digits_bundle)
    test = load_data("digits").test
    for point in manifest.table:
        logits = tail.infer(head.encode(test.x, point.width, point.bits))
        assert float((logits.argmax(1) == test.y).mean()) == point.accuracy


HEAD_PROCESS = """
import sys, numpy as np
from pathlib import Path
from tandem.bundle import HeadRunner
from tandem.data import load_data
head = HeadRunner.from_bundle(Path(sys.argv[1]))
with open(sys.argv[2], "wb") as out:
    for payload in head.encode(load_data("digits").test.x[:32], 0.5, 4):
        out.write(len(payload).to_bytes(2, "little") + payload)
"""

TAIL_PROCESS = """
import sys
from pathlib import Path
from tandem.bundle import TailRunner
data, payloads = open(sys.argv[2], "rb").read(), []
while data:
    n = int.from_bytes(data[:2], "little")
    payloads.append(data[2 : 2 + n])
    data = data[2 + n :]
logits = TailRunner.from_bundle(Path(sys.argv[1])).infer(payloads)
print(" ".join(str(int(i)) for i in logits.argmax(1)))
"""


def test_head_and_tail_run_in_separate_processes(
    tmp_path: Path, digits_bundle: Path, bundle_copy: Path
) -> None:
    """Only bytes pass between the two processes, each holding only its own half."""
    device, cloud = tmp_path / "device", tmp_path / "cloud"
    shutil.copytree(bundle_copy, device)
    shutil.copytree(bundle_copy, cloud)
    (device / "tail.safetensors").unlink()
    (device / "full.safetensors").unlink()
    (cloud / "head.safetensors").unlink()
    wire = tmp_path / "wire.bin"
    subprocess.run([sys.executable, "-c", HEAD_PROCESS, str(device), str(wire)], check=True)
    done = subprocess.run(
        [sys.executable, "-c", TAIL_PROCESS, str(cloud), str(wire)],
        check=True,
        capture_output=True,
        text=True,
    )
    x = load_data("digits").test.x[:32]
    local = TailRunner.from_bundle(digits_bundle).infer(
        HeadRunner.from_bundle(digits_bundle).encode(x, 0.5, 4)
    )
    assert [int(v) for v in done.stdout.split()] == local.argmax(1).tolist()


def test_tail_refuses_foreign_shapes_before_decoding(digits_bundle: Path) -> None:
    """A tiny payload claiming a huge tensor is refused from its header alone."""
    tail = TailRunner.from_bundle(digits_bundle)
    bomb = codec.encode(np.zeros((1, 2048, 2048), np.float32), 8)
    assert len(bomb) < 2048
    tracemalloc.start()
    try:
        with pytest.raises((ValueError, codec.CodecError)):
            tail.infer([codec.encode(np.zeros((4, 4, 4), np.float32), 8), bomb])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("input", "labels"), ["only-one"]),
        (("input", "mean"), [0.1, 0.2]),
        (("bottleneck", "shapes", "0.25"), [3, 4, 4]),
        (("codec", "bits"), 3),
    ],
)
def test_inconsistent_manifest_is_refused(bundle_copy: Path, path: tuple, value: object) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="invalid"):
        read_manifest(bundle_copy)


def test_loading_a_tail_does_not_break_forward_passes_on_other_threads(
    digits_bundle: Path,
) -> None:
    """torch.fx tracing patches nn.Module.__call__ process-wide; serving loads adapted copies
    and new versions while worker threads compute, so a load must not trace again."""
    import threading

    import torch

    runner = TailRunner.from_bundle(digits_bundle)
    z = torch.randn(8, *runner.manifest.bottleneck.shapes[str(1.0)])
    errors: list[BaseException] = []
    stop = threading.Event()

    def forward() -> None:
        while not stop.is_set():
            try:
                with torch.inference_mode():
                    runner.model(z)
            except Exception as exc:  # the failure under test
                errors.append(exc)
                return

    worker = threading.Thread(target=forward)
    worker.start()
    try:
        for _ in range(20):
            TailRunner.from_bundle(digits_bundle)
    finally:
        stop.set()
        worker.join()
    assert errors == []
