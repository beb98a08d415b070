"""Simulating without a trained bundle: an architecture profile plus stated, sourced figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.cli import main
from tandem.sim.profiles import DEVICE_CLASSES
from tandem.sim.report import split_rivals, split_wins, write_report
from tandem.sim.scenario import build, open_scenario, parse_scenario
from tandem.sim.stated import load_arch_profile


@pytest.fixture(scope="module")
def arch_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("arch") / "resnet18-32.json"
    argv = ["profile", "--arch", "resnet18", "--input", "3x32x32", "--num-classes", "10",
            "--arg", "width=0.25", "--arg", "small_input=true", "--repeats", "2",
            "--out", str(out), "--json"]  # fmt: skip
    assert main(argv) == 0
    return out


def _scenario(arch_file: Path, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "stated",
        "model": {
            "arch_profile": str(arch_file),
            "accuracy": {"value": 0.9, "source": "a paper, table 1"},
            "cloud_speedup": {"value": 20, "source": "a benchmark"},
            "split": {"cut": "layer2", "bytes": 300, "accuracy": 0.89, "source": "table 2"},
            "offload": {
                "jpeg": {"bytes": 1200, "accuracy": 0.88, "source": "table 3"},
                "webp": {"bytes": 900, "accuracy": 0.885, "source": "table 3"},
            },
        },
        "devices": [{"count": 2, "class": "rpi4", "uplink": "const:1", "downlink": "const:5"}],
        "strategies": ["local", "offload-jpeg", "offload-webp", "split"],
        "split": {"width": 1.0, "point": 0},
        "duration_s": 2,
    }
    data.update(changes)
    return data


def test_an_architecture_profile_times_every_cut_and_the_whole(arch_file: Path) -> None:
    arch = load_arch_profile(arch_file)
    assert arch.arch == "resnet18" and arch.input == [3, 32, 32] and arch.threads == 1
    assert arch.full_ms > 0
    layer2 = arch.cut("layer2")
    assert layer2.shape == [32, 16, 16] and layer2.raw_bytes == 32 * 16 * 16 * 4
    assert layer2.head_ms > 0 and 0 < layer2.head_flops < layer2.head_flops + layer2.tail_flops
    with pytest.raises(ValueError, match="no cut 'layer9'"):
        arch.cut("layer9")


def test_stated_figures_become_the_strategies(arch_file: Path, tmp_path: Path) -> None:
    setup = build(parse_scenario(_scenario(arch_file)), tmp_path)
    arch, profile = load_arch_profile(arch_file), setup.profile
    wire = profile.wire_overhead_bytes()
    jpeg, webp, split = (setup.strategies[n] for n in ("offload-jpeg", "offload-webp", "split"))
    assert jpeg.up_bytes == pytest.approx(1200 + wire) and jpeg.accuracy == 0.88
    assert webp.up_bytes == pytest.approx(900 + wire) and webp.accuracy == 0.885
    assert split.up_bytes == pytest.approx(300 + wire) and split.accuracy == 0.89
    assert setup.strategies["local"].accuracy == 0.9
    # The device runs the teacher's layers up to the cut, scaled by its class.
    head = arch.cut("layer2").head_ms
    assert setup.devices[0].profile.head_ms[1.0] == pytest.approx(
        head * DEVICE_CLASSES["rpi4"].factor
    )
    # The cloud runs the rest `cloud_speedup` times faster than this machine's one thread.
    cut = arch.cut("layer2")
    share = cut.tail_flops / (cut.head_flops + cut.tail_flops)
    assert profile.tail[1.0].per_input_ms == pytest.approx(arch.full_ms * share / 20)
    assert profile.full_batch.per_input_ms == pytest.approx(arch.full_ms / 20)


def test_a_scenario_names_a_profile_or_a_model_not_both(arch_file: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        parse_scenario(_scenario(arch_file, profile="mnist-host"))
    data = _scenario(arch_file)
    del data["model"]
    with pytest.raises(ValueError, match="exactly one"):
        parse_scenario(data)


def test_an_unstated_codec_is_refused_by_name(arch_file: Path, tmp_path: Path) -> None:
    data = _scenario(arch_file, strategies=["offload-png", "split"])
    with pytest.raises(ValueError, match="no PNG size"):
        build(parse_scenario(data), tmp_path)
    bundle = _scenario(arch_file, strategies=["offload-jpeg"], split=None)
    del bundle["model"]
    bundle["profile"] = "mnist-host"
    with pytest.raises(ValueError, match="no jpeg size"):
        build(parse_scenario(bundle), tmp_path)


def test_the_report_names_the_sources_and_where_split_wins(arch_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_scenario(arch_file)))
    doc = write_report(open_scenario(path), tmp_path / "out", uplink_mbps=(0.1, 50.0))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Stated figures" in report and "table 2" in report and "a benchmark" in report
    accuracy = {"local": 0.9, "offload-jpeg": 0.88, "offload-webp": 0.885, "split": 0.89}
    assert doc["split_wins_mbps"] == split_wins(doc["uplink_curve"], accuracy)
    assert doc["split_rivals"] == {
        "compared": ["local"],
        "less_accurate": ["offload-jpeg", "offload-webp"],
    }
    assert "less accurate than the split" in report
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["split_wins_mbps"] == doc["split_wins_mbps"]


def test_split_wins_where_its_p50_is_below_every_rival() -> None:
    curve = {
        "mbps": [0.1, 1.0, 10.0],
        "p50_ms": {
            "local": [50.0, 50.0, 50.0],
            "offload-jpeg": [900.0, 90.0, 20.0],
            "split": [120.0, 40.0, 30.0],
            "adaptive": [1.0, 1.0, 1.0],  # not a rival: it may choose the split itself
        },
    }
    assert split_wins(curve) == [1.0]
    assert split_wins({"mbps": [1.0], "p50_ms": {"local": [1.0]}}) is None


def test_split_wins_counts_only_offloads_at_least_as_accurate() -> None:
    """A smaller but less accurate input codec is another product, not a faster way to the
    split's answers: it is left out of the comparison, and the report says so."""
    curve = {
        "mbps": [0.1, 1.0],
        "p50_ms": {
            "local": [500.0, 500.0],
            "offload-jpeg": [300.0, 40.0],  # faster everywhere, but less accurate
            "offload-webp": [900.0, 90.0],
            "offload-raw": [9000.0, 900.0],
            "offload-png": [5000.0, 500.0],
            "split": [400.0, 60.0],
        },
    }
    accuracy = {"local": 0.76, "offload-jpeg": 0.72, "offload-webp": 0.753, "split": 0.753,
                "offload-raw": 0.0, "offload-png": 0.0}  # fmt: skip
    assert split_wins(curve) == []
    assert split_wins(curve, accuracy) == [0.1, 1.0]
    # Lossless offloads keep the model's accuracy whatever figure stands for it (0: unknown).
    rivals = ["local", "offload-webp", "offload-raw", "offload-png"]
    assert split_rivals(curve, accuracy) == (rivals, ["offload-jpeg"])
    # An offload whose accuracy is unknown stays a rival too.
    assert split_rivals(curve, {**accuracy, "offload-jpeg": 0.0})[1] == []


def test_a_model_scenario_defaults_to_its_own_strategies(arch_file: Path, tmp_path: Path) -> None:
    data = _scenario(arch_file)
    del data["strategies"], data["split"]
    setup = build(parse_scenario(data), tmp_path)
    assert list(setup.strategies) == ["local", "offload-raw", "offload-jpeg", "offload-webp",
                                      "split"]  # fmt: skip
    assert setup.strategies["offload-raw"].up_bytes > 3 * 32 * 32  # uint8 pixels and envelope


def test_simulator_profiles_are_timed_on_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    argv = ["profile", "--arch", "resnet18", "--input", "3x32x32", "--device", "cuda",
            "--out", str(tmp_path / "p.json"), "--json"]  # fmt: skip
    assert main(argv) == 2
    assert "one CPU thread" in json.loads(capsys.readouterr().out)["error"]
    assert not (tmp_path / "p.json").exists()


ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "sim" / "scenarios" / "imagenet-resnet50-rpi4.yaml"
TRACES = ROOT.parent / "shared" / "traces"


def test_the_shipped_resnet50_scenario_sources_every_figure() -> None:
    data = yaml.safe_load(SHIPPED.read_text())
    model = parse_scenario(data).model
    assert model is not None
    arch = load_arch_profile(ROOT / "sim" / "profiles_data" / f"{model.arch_profile}.json")
    assert arch.arch == "resnet50" and arch.input == [3, 224, 224] and arch.threads == 1
    arch.cut(model.split.cut)  # the stated cut exists in the profile
    assert len(model.sources()) == 5 and all(
        "github.com" in s or "NVIDIA" in s for s in model.sources()
    )


@pytest.mark.skipif(not TRACES.is_dir(), reason=f"{TRACES} is not there")
def test_the_shipped_resnet50_scenario_runs_on_the_shared_traces(tmp_path: Path) -> None:
    doc = write_report(open_scenario(SHIPPED), tmp_path, uplink_mbps=(0.5, 5.0))
    assert set(doc["strategies"]) == {
        "local",
        "offload-raw",
        "offload-jpeg",
        "offload-webp",
        "split",
    }
    # JPEG's stated point is less accurate than the split's: it is not a rival.
    assert doc["split_rivals"]["less_accurate"] == ["offload-jpeg"]
    assert (tmp_path / "report.md").read_text().count("github.com/duanzhiihao/edge-cloud-rac") >= 3
