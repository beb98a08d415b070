"""``tandem fed simulate``: settings parsing, refusals, and a short real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from federation import retrying_ray_start

from tandem.cli import main
from tandem.federated.cli import parse_settings


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


@pytest.mark.slow
def test_simulate_prints_the_result_as_json(
    digits_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "fed", "simulate", "--bundle", str(digits_bundle), "--clients", "2", "--json",
        "--out", str(tmp_path), "--set", "num-rounds=1", "--set", "max-samples=60",
        "--set", "personal-epochs=0", "--set", "eval-samples=20", "--set", "round-timeout=120",
    ]  # fmt: skip

    def run(attempt: int) -> int:
        capsys.readouterr()  # what a failed start printed
        return main(args)

    assert retrying_ray_start(run) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "result.json").read_text())
    assert printed["rounds"][0]["replies"] == 2
