"""``tandem fed simulate``: settings parsing, refusals, and a short real run."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from federation import ray_did_not_start, retrying_ray_start

from tandem.cli import main
from tandem.federated.cli import parse_settings
from tandem.federated.config import FedConfig
from tandem.federated.server_app import initial_adapter


def test_settings_are_typed() -> None:
    assert parse_settings(["num-rounds=3", "lr=0.01", "update-zstd=false", "strategy=ffa"]) == {
        "num-rounds": 3, "lr": 0.01, "update-zstd": False, "strategy": "ffa",
    }  # fmt: skip
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_settings(["num-rounds"])


def test_bad_settings_exit_2_before_anything_starts(
    digits_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["fed", "simulate", "--bundle", str(digits_bundle), "--set", "rank=0"])
    assert code == 2
    assert "rank" in capsys.readouterr().err


def test_a_bad_bundle_or_data_is_refused_before_anything_starts(
    digits_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    def started(*args: object) -> None:
        raise AssertionError("the federation started")

    monkeypatch.setattr("tandem.federated.runtime.run_federation", started)
    assert main(["fed", "simulate", "--bundle", str(tmp_path / "nothing")]) == 2
    assert "not a bundle" in capsys.readouterr().err
    argv = ["fed", "simulate", "--bundle", str(digits_bundle)]
    assert main([*argv, "--set", f"data=npz:{tmp_path / 'absent.npz'}"]) == 2
    assert "no such file" in capsys.readouterr().err


def _entries(folder: Path, pattern: str) -> set[str]:
    return {p.name for p in folder.glob(pattern)}


@pytest.mark.slow
def test_simulate_runs_on_flowers_runtime_logs_once_and_leaves_nothing(
    digits_bundle: Path, tmp_path: Path
) -> None:
    argv = [
        "-v", "fed", "simulate", "--bundle", str(digits_bundle), "--clients", "3", "--json",
        "--out", str(tmp_path), "--set", "num-rounds=1", "--set", "max-samples=60",
        "--set", "personal-epochs=0", "--set", "eval-samples=20", "--set", "round-timeout=120",
    ]  # fmt: skip
    temp = Path(tempfile.gettempdir())
    before = _entries(temp / "ray", "session_*"), _entries(temp, "tandem-fed-*")

    def run(attempt: int) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "tandem.cli", *argv], capture_output=True,
                              text=True, timeout=480, check=False)  # fmt: skip
        if done.returncode != 0 and ray_did_not_start(RuntimeError(done.stderr)):
            raise RuntimeError(done.stderr)  # retried by retrying_ray_start
        return done

    done = retrying_ray_start(run)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed == json.loads((tmp_path / "result.json").read_text())
    (only,) = printed["rounds"]
    assert only["replies"] == 3  # --clients reached Flower's federation config
    cfg = FedConfig.from_run_config({"bundle": str(digits_bundle)})
    fp32 = sum(v.nbytes for v in initial_adapter(cfg).values())
    for c in only["clients"]:
        # Both directions are compressed: the adapter goes down as codec bytes too.
        assert c["bytes_up"] > 0 and 0 < c["bytes_down"] < 0.4 * fp32
    lines = done.stderr.splitlines()
    assert "\x1b[" not in done.stderr  # no colour codes off a terminal
    assert "deprecated" not in done.stderr.lower()
    assert sum("Starting logstream" in line for line in lines) == 1  # each line once
    assert sum("configure_train" in line for line in lines) == 1
    assert (_entries(temp / "ray", "session_*"), _entries(temp, "tandem-fed-*")) == before


def test_flower_lines_are_logged_once_at_their_level_without_colour(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tandem.federated.runtime import forward

    with caplog.at_level(logging.DEBUG, logger="tandem.federated.flower"):
        forward("\x1b[92mINFO \x1b[0m:      configure_train: Sampled 2 nodes (out of 2)\n")
        forward("\x1b[93mWARNING \x1b[0m:   round 1: node 7 did not answer\n")
        forward("\x1b[92mINFO \x1b[0m:      \n")
        forward("a line some process printed\n")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "configure_train: Sampled 2 nodes (out of 2)"),
        ("WARNING", "round 1: node 7 did not answer"),
        ("INFO", "a line some process printed"),
    ]


def test_the_submitted_app_declares_every_setting_with_its_default() -> None:
    import tomllib

    from tandem.federated.runtime import app_pyproject

    app = tomllib.loads(app_pyproject())["tool"]["flwr"]["app"]
    assert app["components"]["serverapp"] == "tandem.federated.server_app:app"
    defaults = FedConfig.from_run_config({"bundle": "b"}).model_dump()
    assert app["config"] == {k.replace("_", "-"): v for k, v in defaults.items()} | {"bundle": ""}
