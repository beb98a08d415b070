"""`flwr run .` for real: on the Deployment Engine (a SuperLink and three SuperNodes as
processes) and on a local simulation SuperLink (Ray backend)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from flower_deployment import BIN, deployment, simulation_link

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _flwr_run(env: dict[str, str], connection: str, config: str, *extra: str) -> None:
    run = subprocess.run(
        [str(BIN / "flwr"), "run", str(ROOT), connection, "--run-config", config, *extra,
         "--stream"],
        env=env, capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def _settings(bundle: Path, out: Path, nodes: int) -> str:
    return (
        f"bundle='{bundle}' num-rounds=1 min-nodes={nodes} min-replies={nodes} max-samples=100 "
        f"eval-samples=40 local-epochs=1 personal-epochs=0 out='{out}'"
    )


def test_a_short_federation_on_superlink_and_three_supernodes(
    digits_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with deployment(tmp_path, nodes=3) as (connection, env, pids):
        _flwr_run(env, connection, _settings(digits_bundle, out, 3))
    result = json.loads((out / "result.json").read_text())
    (only,) = result["rounds"]
    assert (only["replies"], only["failures"], only["missing"]) == (3, 0, 0)
    assert sorted(c["partition"] for c in only["clients"]) == [0, 1, 2]
    assert all(0 < c["bytes_up"] <= 0.02 * result["tail_fp32_bytes"] for c in only["clients"])
    assert not [pid for pid in pids if _alive(pid)], "a Flower process outlived the test"


def test_flwr_run_on_the_local_simulation_engine(digits_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with simulation_link(tmp_path) as (connection, env, pids):
        _flwr_run(env, connection, _settings(digits_bundle, out, 4),
                  "--federation-config", "num-supernodes=4")  # fmt: skip
    (only,) = json.loads((out / "result.json").read_text())["rounds"]
    assert (only["replies"], only["failures"]) == (4, 0)
    assert sorted(c["partition"] for c in only["clients"]) == [0, 1, 2, 3]
    assert not [pid for pid in pids if _alive(pid)]
