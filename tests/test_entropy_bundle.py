"""Bundles with rate points: trained, measured, stored hash-checked, and run by both sides."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tandem import codec, entropy_codec
from tandem.bundle import BundleError, HeadRunner, TailRunner, read_manifest
from tandem.data import load_data
from tandem.entropy_points import ENTROPY_FILE


@pytest.fixture()
def entropy_copy(tmp_path: Path, digits_entropy_bundle: Path) -> Path:
    return Path(
        shutil.copytree(
            digits_entropy_bundle, tmp_path / "b", ignore=shutil.ignore_patterns("checkpoint")
        )
    )


def test_the_manifest_lists_every_rate_point_at_every_width(digits_entropy_bundle: Path) -> None:
    m = read_manifest(digits_entropy_bundle)
    assert m.format_version == 2 and m.entropy is not None and m.entropy.betas == [0.05, 2.0]
    assert ENTROPY_FILE in m.files
    entropy = {(p.width, p.point): p for p in m.table if p.codec == "entropy"}
    assert set(entropy) == {(w, i) for w in m.bottleneck.widths for i in (0, 1)}
    quantize = {(p.width, p.bits) for p in m.table if p.codec == "quantize"}
    assert quantize == {(w, 4) for w in m.bottleneck.widths}
    for p in entropy.values():
        assert p.entropy_bits is not None and p.beta == m.entropy.betas[p.point or 0]
        # Measured bytes: the one-byte header plus the coder's bytes, near the estimate.
        assert p.entropy_bits / 8 < p.bytes_per_sample <= p.entropy_bits / 8 + 6
    # The larger β was trained to spend fewer bits.
    assert entropy[(1.0, 1)].bytes_per_sample < entropy[(1.0, 0)].bytes_per_sample


def test_split_runners_reproduce_the_entropy_points(digits_entropy_bundle: Path) -> None:
    m = read_manifest(digits_entropy_bundle)
    head = HeadRunner.from_bundle(digits_entropy_bundle)
    tail = TailRunner.from_bundle(digits_entropy_bundle)
    test = load_data("digits").test
    for p in (p for p in m.table if p.codec == "entropy"):
        assert p.point is not None
        payloads = head.encode_entropy(test.x, p.width, p.point)
        assert all(entropy_codec.point_of(q) == p.point for q in payloads)
        logits = tail.infer(payloads, p.width)
        assert float((logits.argmax(1) == test.y).mean()) == p.accuracy
        assert float(np.mean([len(q) for q in payloads])) == p.bytes_per_sample


def test_an_entropy_payload_names_its_width_and_a_known_point(
    digits_entropy_bundle: Path,
) -> None:
    head = HeadRunner.from_bundle(digits_entropy_bundle)
    tail = TailRunner.from_bundle(digits_entropy_bundle)
    x = load_data("digits").test.x[:1]
    payload = head.encode_entropy(x, 0.5, 0)[0]
    assert entropy_codec.width_index_of(payload) == 1  # 0.5 among [0.25, 0.5, 0.75, 1.0]
    # Its header says which width it was coded at: no need to be told, and told otherwise,
    # the tail refuses it rather than decode it at the wrong shape.
    assert np.array_equal(tail.infer([payload]), tail.infer([payload], 0.5))
    with pytest.raises(codec.CodecError, match=r"coded at width 0\.5, not 1\.0"):
        tail.infer([payload], 1.0)
    forged = bytes([payload[0] | 0x05]) + payload[1:]  # rate point 5 of a bundle with two
    with pytest.raises(codec.CodecError, match="rate point 5"):
        tail.infer([forged], 0.5)
    with pytest.raises(ValueError, match="rate point 2"):
        head.encode_entropy(x, 0.5, 2)


@pytest.mark.parametrize("loader", [HeadRunner.from_bundle, TailRunner.from_bundle])
def test_tampered_tables_are_detected(entropy_copy: Path, loader: object) -> None:
    path = entropy_copy / ENTROPY_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        loader(entropy_copy)  # type: ignore[operator]


def test_an_oversized_table_file_is_refused_unread(entropy_copy: Path) -> None:
    path = entropy_copy / ENTROPY_FILE
    with path.open("ab") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB that cost nothing to write
    with pytest.raises(BundleError, match="bytes; the manifest allows"):
        HeadRunner.from_bundle(entropy_copy)


def test_tandem_eval_reports_both_codecs_in_one_table_and_chart(
    digits_entropy_bundle: Path, tmp_path: Path
) -> None:
    chart = tmp_path / "rate.png"
    done = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "eval", str(digits_entropy_bundle),
         "--data", "digits", "--bits", "4", "--json", "--plot", str(chart)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert report["plot"] == str(chart)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000
    assert {"png", "zstd19", "webp_lossless"} <= set(report["baselines"])
    points = report["points"]
    codecs = {p["codec"] for p in points}
    assert codecs == {"quantize", "entropy"}
    for p in points:
        assert {"accuracy", "bytes_per_sample", "entropy_bits"} <= set(p)
        assert (p["entropy_bits"] is None) == (p["codec"] == "quantize")
