"""Benchmarks run and print exactly one JSON line with the side-by-side figures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_codec_bench_prints_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert _load("codec").main(["--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    doc = json.loads(out)
    assert doc["shape"] == [32, 12, 28, 28]
    for bits in ("8", "4", "2"):
        assert doc["codec"][bits]["encode_MBps"] > 0 and doc["codec"][bits]["decode_MBps"] > 0
        assert doc["speedup_vs_zstd"][bits]["ratio"] > 1  # quantizing beats lossless zstd
    assert doc["codec"]["2"]["bytes"] < doc["codec"]["4"]["bytes"] < doc["codec"]["8"]["bytes"]
    entropy = doc["entropy"]
    assert entropy["encode_us_per_sample"] > 0 and entropy["decode_us_per_sample"] > 0
    # The range coder lands within a few bytes of the tables' information content, and
    # below the 2-bit quantise+zstd path on the same samples.
    assert entropy["entropy_bits_per_sample"] / 8 <= entropy["bytes_per_sample"]
    assert entropy["bytes_per_sample"] <= entropy["entropy_bits_per_sample"] / 8 + 4
    assert entropy["bytes_per_sample"] < entropy["v1"]["2"]["bytes_per_sample"]


@pytest.mark.slow
def test_serve_bench_prints_one_json_line(
    capsys: pytest.CaptureFixture[str], mnist_small: tuple[Path, Path]
) -> None:
    bundle, npz = mnist_small
    args = ["--bundle", str(bundle), "--data", f"npz:{npz}", "--runs", "1", "--requests", "300"]
    assert _load("serve").main(args) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    (doc,) = json.loads(out)["cases"]  # one per --bundle
    assert doc["raw_best"]["samples_per_s"] > 0
    for compute in ("threads", "processes"):
        for mode in ("unary", "stream", "pipelined"):
            figures = doc["service"][compute][mode]
            assert figures["rps"] > 0 and figures["p99_ms"] >= figures["p50_ms"] > 0
            assert doc["ratios"][f"service_{compute}_{mode}_vs_raw"] > 0
    assert 0 < doc["ratios"]["edge_vs_head"] < 1


@pytest.mark.slow
def test_sim_bench_prints_one_json_line(
    capsys: pytest.CaptureFixture[str], digits_bundle: Path
) -> None:
    args = ["--bundle", str(digits_bundle), "--runs", "1", "--inputs", "30", "--devices", "4"]
    assert _load("sim").main([*args, "--traces", "Verizon-LTE-short"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    doc = json.loads(out)
    for strategy in ("local", "offload-png", "split", "adaptive"):
        assert doc["speed"][strategy]["requests"] > 0
        assert doc["speed"][strategy]["requests_per_s"] > 0
    assert doc["prediction"]["send_overhead_ms"] >= 0
    if (Path(__file__).resolve().parents[2] / "shared" / "traces").is_dir():
        figures = doc["prediction"]["Verizon-LTE-short"]
        assert figures["real_p95_ms"] >= figures["real_p50_ms"] > 0
        assert figures["sim_p50_ms"] > 0


@pytest.mark.slow
def test_adapters_bench_prints_one_json_line(
    capsys: pytest.CaptureFixture[str], digits_bundle: Path
) -> None:
    args = ["--bundle", str(digits_bundle), "--runs", "1", "--requests", "200"]
    assert _load("adapters").main([*args, "--seconds", "0.05"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    doc = json.loads(out)
    assert doc["adapters"]["count"] == 100 and "tail.fc" in doc["adapters"]["targets"]
    mixes = ["0", "1", "10", "100"]
    assert list(doc["in_process"]["samples_per_s"]) == mixes
    assert all(v > 0 for v in doc["in_process"]["samples_per_s"].values())
    for compute in ("threads", "processes"):
        figures = doc["service"][compute]
        assert list(figures) == mixes
        assert all(f["rps"] > 0 and f["p99_ms"] >= f["p50_ms"] > 0 for f in figures.values())
    for kind in ("in_process", "service_threads", "service_processes"):
        assert list(doc["ratios"][kind]) == mixes[1:]
        assert all(r > 0 for r in doc["ratios"][kind].values())


@pytest.mark.slow
def test_fed_bench_prints_one_json_line(
    capsys: pytest.CaptureFixture[str], digits_bundle: Path
) -> None:
    args = ["--bundle", str(digits_bundle), "--clients", "2", "--rounds", "1", "--samples", "40",
            "--epochs", "1", "--set", "eval-samples=20", "--set", "round-timeout=120"]  # fmt: skip
    assert _load("fed").main(args) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    doc = json.loads(out)
    assert len(doc["accuracy_by_round"]) == 1 and len(doc["own_domain"]) == 2
    assert doc["gain"] == pytest.approx(doc["global_accuracy"] - doc["frozen_accuracy"], abs=1e-3)
    assert 0 < doc["bytes_up_fraction_of_tail"] <= 0.02


def test_entropy_bench_prints_one_json_line(
    digits_entropy_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--bundle", str(digits_entropy_bundle), "--data", "digits", "--runs", "1"]
    assert _load("entropy").main([*args, "--samples", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    doc = json.loads(out)
    assert doc["samples"] == 8 and doc["betas"] == [0.05, 2.0]
    for figures in doc["widths"].values():
        us = figures["us_per_sample"]
        assert {"head_batch1", "head_batched", "p0_encode", "p1_decode", "v1_2_encode"} <= set(us)
        assert all(v > 0 for v in us.values())
        assert figures["entropy_encode_vs_head"] > 0
        assert set(figures["bytes_per_sample"]) == {"p0", "p1", "v1_4", "v1_2"}


def test_wire_bench_prints_one_json_line(
    digits_entropy_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--bundle", str(digits_entropy_bundle), "--data", "digits", "--requests", "8"]
    assert _load("wire").main(args) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    points = json.loads(out)["points"]
    assert {p["codec"] for p in points} == {"4-bit+zstd", "2-bit+zstd", "entropy p0", "entropy p1"}
    for p in points:
        # A compact streamed request is its payload and at most 12 bytes; the socket carries
        # more than the message (HTTP/2 and gRPC framing), for either way of sending.
        assert p["codec_bytes"] < p["stream_request_bytes"] <= p["codec_bytes"] + 12
        assert p["stream_request_bytes"] < p["unary_request_bytes"]
        assert p["stream_socket_up"] > p["stream_request_bytes"]
        assert p["unary_socket_up"] > p["unary_request_bytes"]


def test_wire_bench_serves_each_point_at_the_accuracy_eval_measured(
    digits_entropy_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --accuracy, the whole test split streamed over InferStream at each point answers
    with exactly the accuracy ``tandem eval`` stored for it."""
    args = ["--bundle", str(digits_entropy_bundle), "--data", "digits", "--requests", "4",
            "--accuracy"]  # fmt: skip
    assert _load("wire").main(args) == 0
    points = json.loads(capsys.readouterr().out)["points"]
    checked = [p for p in points if p["eval_accuracy"] is not None]
    # The bundle's table measured 4 bits and both rate points, at every width.
    assert {p["codec"] for p in checked} == {"4-bit+zstd", "entropy p0", "entropy p1"}
    for p in checked:
        assert p["served_samples"] == 359
        assert p["served_accuracy"] == pytest.approx(p["eval_accuracy"], abs=1e-12), p


def test_head_bench_prints_one_json_line(
    digits_entropy_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--bundle", f"digits={digits_entropy_bundle},digits", "--repeats", "2",
            "--samples", "50"]  # fmt: skip
    assert _load("head").main(args) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    row = json.loads(out)["bundles"]["digits"]
    for batch in ("batch_1", "batch_32"):
        timing = row["ms_per_sample"][batch]
        assert timing["torch"] > 0 and timing["onnx"] > 0
        assert timing["torch_over_onnx"] == pytest.approx(timing["torch"] / timing["onnx"], 0.01)
    assert set(row["identical_payloads"]) == {"2-bit", "4-bit", "8-bit", "rate point 0",
                                              "rate point 1"}  # fmt: skip
    assert all(0 <= v <= 1 for v in row["identical_payloads"].values())
    assert row["identical_predictions"] == 1.0 and row["max_abs_diff"] < 1e-5
    assert not (digits_entropy_bundle / "onnx").exists()  # exported in a scratch copy
