"""``tandem sim run`` and ``tandem sim sweep`` as a user runs them: separate processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tandem.bundle import read_manifest

TINY = {
    "name": "cli-tiny",
    "profile": "mnist-host",
    "devices": [{"count": 2, "class": "rpi4", "uplink": "walk:3,1@0.5", "downlink": "const:10"}],
    "strategies": ["local", "offload-png", "split", "adaptive"],
    "split": {"width": 0.25, "bits": 4},
    "duration_s": 5,
}


def _tandem(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tandem.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def scenario(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_run_json_prints_the_summary_it_writes(scenario: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _tandem("sim", "run", str(scenario), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    doc = json.loads(result.stdout)
    assert doc == json.loads((out / "summary.json").read_text())
    assert list(doc["strategies"]) == TINY["strategies"]
    assert doc["strategies"]["local"]["requests"] == 2 * 5 * 10
    assert sorted(p.name for p in out.iterdir()) == sorted(doc["files"])
    assert "report.md" in doc["files"]
    assert result.stderr == ""  # no progress bar without a terminal


def test_run_prints_a_table(scenario: Path, tmp_path: Path) -> None:
    result = _tandem("sim", "run", str(scenario), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("scenario cli-tiny: 2 devices, 5 s simulated, SLO 100 ms")
    assert lines[1].split()[:2] == ["strategy", "requests"]
    assert [line.split()[0] for line in lines[2:6]] == TINY["strategies"]
    assert lines[-1].startswith("400 requests simulated in ")


def test_sweep_json(scenario: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = ("--param", "bandwidth", "--values", "0.5,5", "--out", str(out), "--json")
    result = _tandem("sim", "sweep", str(scenario), *args)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    doc = json.loads(result.stdout)
    assert doc == json.loads((out / "sweep.json").read_text())
    assert (doc["param"], doc["values"]) == ("bandwidth", [0.5, 5.0])
    slow, fast = (p["strategies"]["offload-png"]["latency_ms"]["p50"] for p in doc["points"])
    assert slow > fast
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json", "sweep.md", "sweep.png"]


@pytest.mark.parametrize(
    ("args", "change", "expected"),
    [
        ((), {"devices": [{"count": 1, "class": "pi9"}]}, "devices.0.class: unknown device"),
        ((), {"split": {"width": 0.3, "bits": 4}}, "split: width 0.3, bits 4 is not a row"),
        (("sweep", "--param", "devices", "--values", "2,x"), {}, "--values: expected"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(
    tmp_path: Path, args: tuple[str, ...], change: dict[str, object], expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TINY, **change}))
    command = args[0] if args else "run"
    result = _tandem("sim", command, str(path), *args[1:], "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("tandem: error: ") and expected in line
    assert not (tmp_path / "o").exists()


def test_profile_measures_a_bundle_and_the_daemon_overhead(
    tmp_path: Path, digits_entropy_bundle: Path
) -> None:
    """The profile of a bundle with rate points: every row of its table, rate points too,
    and the daemon's overhead and framing measured through the emulator."""
    out = tmp_path / "digits-host.json"
    args = ["--bundle", str(digits_entropy_bundle), "--data", "digits", "--out", str(out)]
    done = _tandem("profile", *args, "--calibrate", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc == json.loads(out.read_text())
    assert set(doc["head_ms"]) == {"0.25", "0.5", "0.75", "1.0"}
    assert doc["full_ms"] > 0 and doc["send_overhead_ms"] > 0
    assert doc["tail"]["0.5"]["per_input_ms"] > 0
    assert doc["input_bytes"] == 64  # one 8x8 uint8 digit
    table = read_manifest(digits_entropy_bundle).table
    assert [(r["width"], r["bits"], r["point"]) for r in doc["table"]] == [
        (p.width, p.bits, p.point) for p in table
    ]
    assert {r["point"] for r in doc["table"]} == {None, 0, 1}
    assert doc["frame_overhead_bytes"] > 9 and doc["response_bytes"] > 40


def test_profile_rejects_a_directory_that_is_no_bundle(tmp_path: Path) -> None:
    args = ["--bundle", str(tmp_path), "--data", "digits", "--out", str(tmp_path / "p.json")]
    done = _tandem("profile", *args)
    assert done.returncode == 2
    assert done.stderr.startswith("tandem: error:") and done.stderr.count("\n") == 1


def test_profile_needs_a_model_or_a_bundle() -> None:
    done = _tandem("profile")
    assert done.returncode == 2
    assert done.stderr == "tandem: error: profile needs --arch and --input (or --bundle)\n"


def test_request_overhead_counts_what_the_daemon_puts_around_the_payload() -> None:
    from tandem import codec
    from tandem.sim.profiles import request_overhead

    payload = codec.encode(np.random.default_rng(0).normal(size=(2, 7, 7)).astype("float32"), 4)
    # On the stream: context 1+1, seq 1+2, answers_read 1+2, the payload's tag and length 1+1
    # (1+2 from 128 bytes on). Names travel once per stream, in the context's definition.
    assert len(payload) < 128 and request_overhead(payload) == 10
    assert len(payload * 3) >= 128 and request_overhead(payload * 3) == 11
