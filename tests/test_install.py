"""What a device installs: the wheel, its import names, and the ``edge`` extra on its own.

The slow test builds the wheel, installs ``tandem[edge]`` alone into a fresh virtual
environment (no PyTorch comes with it) and runs that environment's ``tandem edge run
--runtime onnx`` on a bundle whose head was exported to ONNX, against a service from the
development environment, over real gRPC on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from serving import ROOT, make_repo, server_process

from tandem.data import load_data
from tandem.onnx_export import export_onnx

# Distributions a device must not be made to carry (the list, by distribution name).
NOT_ON_A_DEVICE = {
    "torch",
    "grpcio-tools",
    "onnx",
    "onnxscript",
    "flwr",
    "flwr-datasets",
    "ray",
    "peft",
    "transformers",
    "datasets",
    "matplotlib",
    "scikit-learn",
    "pandas",
    "pyarrow",
    "fastapi",
    "prometheus-client",
}


def _clean_env() -> dict[str, str]:
    """This process's environment less what would let a child see the development
    environment's packages (PYTHONPATH, which Flower's Ray backend sets in-process, say)."""
    keep = ("PATH", "HOME", "LANG", "LC_", "TMPDIR", "PIP_", "SSL_", "REQUESTS_CA_BUNDLE")
    return {k: v for k, v in os.environ.items() if k.startswith(keep)}


def _run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("env", _clean_env())
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, (
        f"{command[:4]} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}"
    )
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(out)])
    (path,) = out.glob("tandem-*.whl")
    return path


def test_the_wheel_installs_only_tandem_at_top_level(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = archive.read(next(n for n in names if n.endswith("top_level.txt")))
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"tandem"}
    assert top_level.decode().split() == ["tandem"]
    # The roles travel inside tandem/, with their data files.
    for path in (
        "tandem/edge/daemon.py",
        "tandem/cloud/server.py",
        "tandem/federated/server_app.py",
        "tandem/sim/des.py",
        "tandem/digits.npz",
        "tandem/recipes/digits.toml",
    ):
        assert path in names
    assert any(n.startswith("tandem/sim/profiles_data/") for n in names)
    assert any(n.startswith("tandem/sim/scenarios/") for n in names)


def test_the_edge_extra_asks_for_no_server_side_distribution(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith("METADATA")))
    required = [
        line.split(":", 1)[1].strip()
        for line in metadata.decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    core_or_edge = [r for r in required if "extra ==" not in r or 'extra == "edge"' in r]
    names = {r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()
             for r in core_or_edge}  # fmt: skip
    assert names, "no core requirements found"
    assert not names & NOT_ON_A_DEVICE


@pytest.mark.slow
def test_an_edge_only_install_serves_against_a_service(
    wheel: Path, digits_bundle: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "device"
    _run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    _run([*pip, f"{wheel}[edge]"])
    listed = _run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"]).stdout
    installed = {d["name"].lower() for d in json.loads(listed)}
    assert "tandem" in installed
    assert not installed & NOT_ON_A_DEVICE, installed & NOT_ON_A_DEVICE

    tandem = str(venv / "bin" / "tandem")
    env = _clean_env()
    # The server role is not there, and says which extra brings it.
    refused = subprocess.run(
        [tandem, "cloud", "serve", "--models", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
    assert "tandem[cloud]" in refused.stderr

    source = tmp_path / "inputs.jsonl"
    test = load_data("digits").test
    rows = [
        {"input": x[0].tolist(), "label": int(y)}
        for x, y in zip(test.x[:20], test.y[:20], strict=True)
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    repo = make_repo(tmp_path, digits_bundle)
    export_onnx(repo / "digits")  # here, where PyTorch is: the device only runs the result
    sink = tmp_path / "out.jsonl"
    with server_process("--models", str(repo), "--listen", "127.0.0.1:0") as (_, ready):
        done = subprocess.run(
            [tandem, "edge", "run", "--json", "--bundle", str(repo / "digits"),
             "--cloud", ready["address"], "--source", f"jsonl:{source}", "--sink", str(sink),
             "--spool", str(tmp_path / "spool.db"), "--no-fallback", "--runtime", "onnx"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in sink.read_text().splitlines()]
    assert len(results) == len(rows)
    assert all("error" not in r and r["served_by"] != "local" for r in results), results[:2]
    assert sorted(r["input_index"] for r in results) == list(range(len(rows)))


def test_the_shipped_digits_are_scikit_learns_set() -> None:
    """tandem/digits.npz holds scikit-learn's 1,797 digits unchanged (0..16, ten classes)."""
    import hashlib

    import numpy as np

    from tandem.data import DIGITS_FILE

    with np.load(DIGITS_FILE) as arrays:
        images, target = arrays["images"], arrays["target"]
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16
    assert np.bincount(target).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # Taken from sklearn.datasets.load_digits() when the file was written.
    digest = hashlib.sha256(images.tobytes() + target.tobytes()).hexdigest()
    assert digest == "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"
