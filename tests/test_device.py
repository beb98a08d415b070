"""--device: where commands compute, mixed precision on CUDA, and the GPU bench's refusal.

This machine has no GPU: the tests check the CPU paths, the choices ``auto`` makes, and that
a CUDA device asked for and absent is a one-line error, never a silent CPU run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from phases import run_phase
from torch import nn

from tandem.cli import main
from tandem.config import OptimConfig, RecipeError, load_recipe
from tandem.device import DeviceError, autocast, grad_scaler, resolve_device

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_auto_is_the_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU


def test_auto_takes_cuda_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="there are 2 CUDA devices"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_an_absent_gpu_is_an_error_not_a_cpu_run(
    spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="sees no CUDA device"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "CPU", ""])
def test_unknown_device_spellings(spec: str) -> None:
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device(spec)


@pytest.mark.parametrize("command", ["train digits --data digits --out {out}", "eval {out}"])
def test_commands_refuse_an_absent_gpu_in_one_line(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [*command.format(out=tmp_path / "b").split(), "--device", "cuda", "--json"]
    if argv[0] == "eval":
        argv[2:2] = ["--data", "digits"]
    assert main(argv) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["type"] == "DeviceError" and "sees no CUDA device" in doc["error"]
    assert not (tmp_path / "b").exists()  # refused before anything was trained or read


def test_profile_reports_its_device(capsys: pytest.CaptureFixture) -> None:
    argv = ["profile", "--arch", "resnet18", "--input", "3x32x32", "--num-classes", "10",
            "--arg", "width=0.25", "--repeats", "1", "--device", "cpu", "--json"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["device"] == "cpu" and doc["cuts"]


def test_mixed_precision_is_cuda_only() -> None:
    assert isinstance(autocast(CPU, "bf16"), type(autocast(CPU, "fp32")))
    assert not grad_scaler(CPU, "fp16").is_enabled()
    with pytest.raises(RecipeError, match="precision"):
        load_recipe("digits", ["precision='fp8'"])
    assert load_recipe("digits", ["precision='bf16'"]).precision == "bf16"


def test_a_cpu_run_trains_the_same_whatever_the_precision(tmp_path: Path) -> None:
    """The recipe's precision applies on CUDA; on the CPU a bf16 recipe trains in fp32,
    bit for bit as an fp32 one."""
    cfg = OptimConfig(epochs=2, batch_size=16, lr=1e-2)

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    fp32 = run_phase(tmp_path / "a", cfg, model, device=CPU, precision="fp32").state_dict()
    bf16 = run_phase(tmp_path / "b", cfg, model, device=CPU, precision="bf16").state_dict()
    for key in fp32:
        torch.testing.assert_close(fp32[key], bf16[key], rtol=0, atol=0)


def _gpu_bench() -> object:
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_bench_refuses_without_cuda(digits_bundle: Path) -> None:
    env_hide = "import torch; torch.cuda.is_available = lambda: False; "
    run = (
        f"{env_hide}import runpy, sys; sys.argv = ['gpu.py'] + sys.argv[1:]; "
        f"runpy.run_path('{ROOT / 'bench' / 'gpu.py'}', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", run, "--bundle", str(digits_bundle), "--data", "digits"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert "needs a CUDA device" in done.stderr


def test_the_gpu_bench_measures_on_the_cpu_what_it_measures_on_a_gpu(
    digits_bundle: Path,
) -> None:
    """Its two measurements run here on the CPU (the GPU run differs only in the device)."""
    bench = _gpu_bench()
    args = argparse.Namespace(steps=1, runs=1)
    rate = bench.train_rate("digits", (1, 8, 8), 10, CPU, "fp32", args)  # type: ignore[attr-defined]
    assert rate > 0
    from tandem.bundle import HeadRunner
    from tandem.data import load_data

    x = load_data("digits").test.take(range(8))
    payloads = HeadRunner.from_bundle(digits_bundle).encode(x, 1.0)
    rates = bench.serve_rates(digits_bundle, payloads, 1.0, CPU, 1)  # type: ignore[attr-defined]
    assert set(rates) == {"1", "8", "32", "128", "512"} and min(rates.values()) > 0


# ------------------------------------------------------------------ the cloud service


def _serve_cfg(tmp_path: Path, **changes: object) -> object:
    from tandem.cloud.config import ServeConfig

    return ServeConfig.model_validate({"models": tmp_path, **changes})


def test_serving_device_resolves_like_the_other_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tandem.cloud.server import serving_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert serving_device(_serve_cfg(tmp_path)) == torch.device("cuda")  # type: ignore[arg-type]
    assert serving_device(_serve_cfg(tmp_path, device="cpu")) == CPU  # type: ignore[arg-type]
    # Worker processes run on the CPU: auto means the CPU there, and a GPU is refused.
    processes = _serve_cfg(tmp_path, compute="processes")
    assert serving_device(processes) == CPU  # type: ignore[arg-type]
    with pytest.raises(DeviceError, match="--compute threads"):
        serving_device(_serve_cfg(tmp_path, compute="processes", device="cuda"))  # type: ignore[arg-type]


def test_cloud_serve_refuses_an_absent_gpu_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    missing = tmp_path / "no-such-repository"  # would fail too, but later: the device goes first
    argv = ["cloud", "serve", "--models", str(missing), "--device", "cuda", "--json"]
    assert main(argv) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["type"] == "DeviceError" and "sees no CUDA device" in doc["error"]


def test_the_repository_loads_its_tails_onto_its_device(
    digits_bundle: Path, tmp_path: Path
) -> None:
    import shutil

    from tandem.cloud.repository import ModelRepository

    shutil.copytree(digits_bundle, tmp_path / "digits")
    # "cpu:0" is a device of its own name: a repository that dropped it would load onto "cpu".
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu", 0)
    repository = ModelRepository(tmp_path, device=device)
    assert repository.scan() == 1
    (entry,) = repository.models()
    assert entry.runner.device == device
    assert {p.device.type for p in entry.runner.model.parameters()} == {device.type}
    assert {p.device.type for p in entry.mixed().model.parameters()} == {device.type}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_service_answers_on_the_gpu_what_it_answers_on_the_cpu(
    digits_bundle: Path, tmp_path: Path
) -> None:
    """The service's batch path (decode, copy, forward; a corrupt row failing alone) on a GPU
    repository, against the same on the CPU."""
    import shutil

    from tandem.bundle import HeadRunner
    from tandem.cloud.inference import run_batch
    from tandem.cloud.repository import ModelRepository
    from tandem.data import load_data

    shutil.copytree(digits_bundle, tmp_path / "digits")
    x = load_data("digits").test.take(range(64))
    payloads = [*HeadRunner.from_bundle(digits_bundle).encode(x, 1.0), b"corrupt"]
    logits = []
    for device in (CPU, torch.device("cuda")):
        repository = ModelRepository(tmp_path, device=device)
        repository.scan()
        (entry,) = repository.models()
        out = run_batch(entry, [None] * len(payloads), payloads, 1.0)
        assert list(out.errors) == [64]
        logits.append(torch.from_numpy(out.logits))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ federated clients


class _Context:
    def __init__(self, node_config: dict[str, object]) -> None:
        self.node_config = node_config


def test_a_federated_node_computes_where_its_node_config_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tandem.federated.client_app import node_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert node_device(_Context({"partition-id": 0})) == CPU  # type: ignore[arg-type]
    assert node_device(_Context({"device": "cpu"})) == CPU  # type: ignore[arg-type]
    with pytest.raises(DeviceError, match="sees no CUDA device"):
        node_device(_Context({"device": "cuda"}))  # type: ignore[arg-type]
