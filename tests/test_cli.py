"""The ``tandem`` command: JSON output, human tables, clear errors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.cli import main
from tandem.input_codecs import QUALITIES


def _json(capsys: pytest.CaptureFixture[str]) -> dict:
    out = capsys.readouterr().out
    assert out.count("\n") == 1, "--json prints exactly one line"
    return json.loads(out)


def test_eval_json_report(digits_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(digits_bundle), "--data", "digits", "--json"]) == 0
    report = _json(capsys)
    assert 0 <= report["teacher"]["accuracy"] <= 1 and report["teacher"]["measured"]
    assert report["baselines"]["raw"] == 64
    assert report["baselines"]["zstd19"] > 0 and report["baselines"]["png"] > 0
    assert len(report["points"]) == 16
    for p in report["points"]:
        assert set(p) == {"width", "codec", "bits", "point", "beta", "accuracy",
                          "bytes_per_sample", "entropy_bits"}  # fmt: skip
        assert p["codec"] == "quantize" and p["point"] is None  # a bundle without rate points
        assert 0 <= p["accuracy"] <= 1 and p["bytes_per_sample"] > 0
    assert 0 < report["head_flops_share"] < 1
    grid = [(codec, q) for codec, qualities in QUALITIES.items() for q in qualities]
    assert [(r["codec"], r["quality"]) for r in report["input_codecs"]] == grid
    assert report["equal_accuracy"]["within"] == 0.01  # the default, 1 pp


def test_eval_text_and_bits(digits_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(digits_bundle), "--data", "digits", "--bits", "4"]) == 0
    out = capsys.readouterr().out
    assert "sending the input instead" in out and "png    lossless" in out
    assert "within 1 pp of the teacher: cheapest input " in out
    assert "teacher accuracy" in out and "bytes/sample" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:2] in ("0.", "1.")]
    assert [(r[0], r[1]) for r in rows] == [
        ("0.25", "4-bit+zstd"),
        ("0.50", "4-bit+zstd"),
        ("0.75", "4-bit+zstd"),
        ("1.00", "4-bit+zstd"),
    ]


def test_profile_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["profile", "--arch", "resnet18", "--input", "1x28x28", "--num-classes", "10"]
    extra = ["--arg", "width=0.25", "--arg", "small_input=true", "--repeats", "1", "--json"]
    assert main(args + extra) == 0
    doc = _json(capsys)
    names = [c["name"] for c in doc["cuts"]]
    assert "layer2" in names
    layer2 = doc["cuts"][names.index("layer2")]
    assert layer2["shape"] == [32, 14, 14] and layer2["raw_bytes"] == 32 * 14 * 14 * 4


def test_profile_only_the_named_cuts_in_execution_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["profile", "--arch", "resnet18", "--input", "1x28x28", "--num-classes", "10"]
    extra = ["--arg", "width=0.25", "--cut", "layer3", "--cut", "layer1", "--repeats", "0"]
    assert main([*args, *extra, "--json"]) == 0
    assert [c["name"] for c in _json(capsys)["cuts"]] == ["layer1", "layer3"]
    assert main([*args, "--cut", "layer9"]) == 2
    assert "unknown cut point 'layer9'" in capsys.readouterr().err


def test_train_json_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sets = ["teacher.train.epochs=1", "distill.head.epochs=1", "distill.finetune.epochs=1"]
    argv = ["train", "digits", "--data", "digits", "--out", str(tmp_path / "b"), "--json"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    doc = _json(capsys)
    assert doc["recipe"] == "digits" and len(doc["points"]) == 16
    assert (tmp_path / "b" / "manifest.json").is_file()
    # The same table under the same keys as `tandem eval --json` prints it.
    assert main(["eval", str(tmp_path / "b"), "--data", "digits", "--json"]) == 0
    report = _json(capsys)
    assert {"bundle", "teacher", "points"} <= set(doc) & set(report)
    assert [set(p) for p in doc["points"]] == [set(p) for p in report["points"]]
    assert set(doc["teacher"]) == set(report["teacher"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "nope", "--data", "digits", "--out", "x"], "no recipe"),
        (["eval", "/nonexistent", "--data", "digits"], "not a bundle"),
        (["profile", "--arch", "alexnet", "--input", "3x8x8"], "unknown model"),
        (["profile", "--arch", "resnet18", "--input", "3x8x8", "--arg", "depth=3"], "depth"),
        (["profile", "--arch", "resnet18", "--input", "3x8x8", "--arg", "width"], "KEY=VALUE"),
    ],
)
def test_errors_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tandem: error:") and message in err


def test_bad_shape_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--arch", "resnet18", "--input", "3xfoo"]) == 2
    captured = capsys.readouterr()
    assert "3x224x224" in captured.err and captured.err.startswith("usage:")
    assert captured.out == ""


def test_demo_json_is_one_document(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["demo", "--json", "--report", str(tmp_path / "report")]) == 0
    doc = _json(capsys)
    sim = doc["simulated"]
    assert set(sim["strategies"]) == {"local", "offload-png", "split", "adaptive"}
    assert sim["emulated_p50_ms"] > 40  # two 20 ms one-way delays
    assert abs(sim["simulated_p50_ms"] - sim["emulated_p50_ms"]) <= 0.15 * sim["emulated_p50_ms"]
    for name in ("report.md", "summary.json", "latency_vs_uplink.png", "latency_cdf.png"):
        assert (tmp_path / "report" / name).is_file()
    assert doc["train_seconds"] > 0
    report = doc["eval"]
    # Four widths, each with four bit depths and two rate points.
    assert report["samples"] == 359 and len(report["points"]) == 24
    assert sum(p["codec"] == "entropy" for p in report["points"]) == 8
    # The full digits recipe learns: the best point is within a point of the teacher.
    best = max(p["accuracy"] for p in report["points"])
    assert best >= report["teacher"]["accuracy"] - 0.01 and best > 0.95
    # The entropy codec's smallest point is smaller than the 2-bit codec's.
    sizes = {c: min(p["bytes_per_sample"] for p in report["points"] if p["codec"] == c)
             for c in ("entropy", "quantize")}  # fmt: skip
    assert sizes["entropy"] < sizes["quantize"]


def test_edge_run_names_a_head_adapter_that_does_not_fit(
    digits_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["edge", "run", "--bundle", str(digits_bundle), "--cloud", "127.0.0.1:1"]
    common += ["--source", "-", "--sink", str(tmp_path / "out.jsonl")]
    assert main([*common, "--head-adapter", str(tmp_path / "missing")]) == 2
    assert "adapter directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*common, "--head-adapter", str(tmp_path / "empty")]) == 2
    assert "adapter config" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()  # nothing was started


# --- The CLI a person expects (issue 12, requirement 9) -------------------------------------


def _every_action() -> list[tuple[str, argparse.ArgumentParser, argparse.Action]]:
    from tandem.cli import build_parser, iter_parsers

    return [
        (p.prog, p, a)
        for p in iter_parsers(build_parser())
        for a in p._actions
        if not isinstance(a, argparse._SubParsersAction)
    ]


def test_every_option_has_help_with_its_default_shown() -> None:
    actions = _every_action()
    assert len({prog for prog, _, _ in actions}) >= 14  # tandem, train, ..., fed simulate
    missing, unshown = [], []
    for prog, parser, action in actions:
        text = parser._get_formatter()._expand_help(action) if action.help else ""
        name = f"{prog} {'/'.join(action.option_strings) or action.dest}"
        if not text.strip() or action.help == argparse.SUPPRESS:
            missing.append(name)
        default = action.default
        meaningful = default not in (None, argparse.SUPPRESS, False, [], "")
        shown = f"(default: {default})" in text or "(default: " in str(action.help)
        if action.option_strings and meaningful and not shown:
            unshown.append(f"{name}: {text!r}")
    assert not missing, f"options without help: {missing}"
    assert not unshown, f"defaults not shown: {unshown}"


@pytest.mark.parametrize(
    "argv",
    [
        ["-v", "edge", "run", "--bundle", "b", "--cloud", "c", "--source", "-"],
        ["edge", "run", "-v", "--bundle", "b", "--cloud", "c", "--source", "-"],
        ["edge", "run", "--bundle", "b", "--cloud", "c", "--source", "-", "--verbose"],
        ["train", "digits", "--data", "digits", "--out", "o", "-v"],
        ["fed", "simulate", "--bundle", "b", "-v"],
        ["sim", "run", "s.yaml", "--out", "o", "-v"],
    ],
)
def test_verbose_is_accepted_before_and_after_the_subcommand(argv: list[str]) -> None:
    from tandem.cli import build_parser

    assert build_parser().parse_args(argv).verbose is True


def test_verbose_is_off_unless_given() -> None:
    from tandem.cli import build_parser

    argv = ["edge", "run", "--bundle", "b", "--cloud", "c", "--source", "-"]
    assert build_parser().parse_args(argv).verbose is False


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tandem: error:"), err
    return err


def test_a_recipe_validation_error_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "digits", "--data", "digits", "--out", str(tmp_path / "b")]
    assert main([*argv, "--set", "teacher.train.epochs=-1"]) == 2
    err = _one_line_error(capsys)
    assert "teacher.train.epochs" in err and "greater than or equal to 0" in err


def test_a_manifest_validation_error_is_one_line(
    digits_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(digits_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["num_classes"] = "many"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert main(["eval", str(bundle), "--data", "digits"]) == 2
    err = _one_line_error(capsys)
    assert "num_classes" in err


def test_a_settings_error_says_its_problem_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, the problem was said twice: once in the message, once more from its cause."""
    argv = ["cloud", "serve", "--models", str(tmp_path), "--metrics-listen", "0.0.0.0:9999"]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert err.count("refusing plain-HTTP metrics") == 1, err


def test_json_failure_is_a_json_error_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "/nonexistent", "--data", "digits", "--json"]) == 2
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["type"] == "BundleError" and "not a bundle" in doc["error"]
    assert captured.err.startswith("tandem: error:")


def test_json_usage_error_is_a_json_error_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "b", "--data", "digits", "--bits", "x", "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["type"] == "UsageError" and "--bits" in doc["error"]


@pytest.mark.parametrize("within", ["-1", "nan", "x"])
def test_a_negative_or_unreadable_within_is_a_usage_error(
    within: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "b", "--data", "digits", "--within", within, "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["type"] == "UsageError" and "--within" in doc["error"]


def test_output_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written, as with `| head -0`
    argv = ["profile", "--arch", "resnet18", "--input", "1x28x28", "--num-classes", "10"]
    argv += ["--arg", "width=0.25", "--arg", "small_input=true", "--repeats", "0"]
    try:
        run = subprocess.run(
            [sys.executable, "-m", "tandem.cli", *argv], stdout=write_end,
            stderr=subprocess.PIPE, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert run.stderr == ""
    assert run.returncode == 141  # as a shell reports a writer stopped by SIGPIPE


def test_eval_on_a_folder_with_an_unreadable_image_stops_or_skips_it(
    tmp_path: Path,
    digits_bundle: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One line naming the file and exit 2; with --skip-unreadable, a warning and the run."""
    from PIL import Image

    folder = tmp_path / "folder"
    for label in ("zero", "one"):
        (folder / label).mkdir(parents=True)
        for i in range(5):
            Image.new("L", (8, 8), 40 * i).save(folder / label / f"{i}.png")
    (folder / "one" / "bad.jpg").write_bytes(b"GIF89a, not a JPEG")
    argv = ["eval", str(digits_bundle), "--data", f"imagefolder:{folder}", "--bits", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot read image {folder / 'one' / 'bad.jpg'}: " in err
    assert main([*argv, "--skip-unreadable", "--json"]) == 0
    assert _json(capsys)["samples"] == 2  # a seeded fifth of the ten good images
    assert f"skipped 1 unreadable images under {folder} (first: " in caplog.text


@pytest.mark.parametrize(
    ("module", "command", "extra"),
    [("torch", "train", "train"), ("torch", "cloud", "cloud"), ("torch", "fed", "fed"),
     ("torch", "edge", "train"), ("onnxruntime", "edge", "edge"), ("peft", "fed", "fed")],
)  # fmt: skip
def test_a_missing_module_names_the_extra_that_brings_it_for_the_command(
    module: str, command: str, extra: str
) -> None:
    from tandem.cli import missing_extra

    hint = missing_extra(ModuleNotFoundError(f"No module named {module!r}", name=module), command)
    assert hint is not None and f"pip install 'tandem[{extra}]'" in hint
    assert ("--runtime onnx" in hint) == (module == "torch" and command == "edge")
    assert missing_extra(ModuleNotFoundError("x", name="somethingelse"), command) is None
