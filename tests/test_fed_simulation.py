"""The Flower app end to end in Flower's simulation engine (in-process, Ray backend, so that
fault-injecting client mods can be passed in)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from federation import simulate
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from tandem.cloud.repository import ModelRepository
from tandem.federated.client_app import make_client_app

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _ray_sessions_kept_apart() -> Iterator[None]:
    """Ray's session directories in a temporary directory of this module's, removed after,
    not left under /tmp/ray (short: Ray's socket paths must fit in 107 bytes)."""
    saved = os.environ.get("RAY_TMPDIR")
    with tempfile.TemporaryDirectory(prefix="tray-", ignore_cleanup_errors=True) as tmp:
        os.environ["RAY_TMPDIR"] = tmp
        try:
            yield
        finally:
            ray.shutdown()
            if saved is None:
                del os.environ["RAY_TMPDIR"]
            else:
                os.environ["RAY_TMPDIR"] = saved


def _federate(
    bundle: Path, out: Path, nodes: int, mods: tuple[Any, ...] = (), **config: Any
) -> dict[str, Any]:
    settings = {
        "bundle": str(bundle), "num-rounds": 2, "min-nodes": nodes, "min-replies": 2,
        "max-samples": 120, "eval-samples": 40, "local-epochs": 1, "round-timeout": 120.0,
        "out": str(out), **config,
    }  # fmt: skip
    return simulate(settings, make_client_app(mods), nodes)


def _fail_partition(partition: int) -> Any:
    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if context.node_config["partition-id"] == partition:
            raise RuntimeError("this device crashed")
        return call_next(msg, context)

    return mod


def _stall_partition(partition: int, seconds: float) -> Any:
    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if context.node_config["partition-id"] == partition:
            time.sleep(seconds)
        return call_next(msg, context)

    return mod


def test_fedit_with_a_crashing_client_publishes_into_the_repository(
    digits_bundle: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(digits_bundle, repo / "digits")
    result = _federate(
        digits_bundle, tmp_path / "out", 3, (_fail_partition(2),),
        publish=str(repo / "digits"), **{"update-bits": 8},
    )  # fmt: skip
    rounds = result["rounds"]
    assert [(r["replies"], r["failures"], r["skipped"]) for r in rounds] == [(2, 0 + 1, False)] * 2
    assert all("crashed" in r["errors"][0] for r in rounds)
    for r in rounds:
        assert {c["partition"] for c in r["clients"]} == {0, 1}
        for c in r["clients"]:
            # Requirement: a client sends at most 2% of the tail's float32 weights per round.
            assert 0 < c["bytes_up"] <= 0.02 * result["tail_fp32_bytes"]
            assert c["bytes_down"] > c["bytes_up"]
    assert result["global_accuracy"] == rounds[-1]["accuracy"]
    assert result["personal"]["replies"] == 2
    published = [Path(p) for p in result["published"]]
    assert published == [repo / "digits" / "adapters" / "federated" / "1"]
    repository = ModelRepository(repo)
    repository.scan()
    entry = repository.resolve("digits")
    assert entry.adapter("federated").version == "1"


def test_a_straggler_does_not_stall_the_round(digits_bundle: Path, tmp_path: Path) -> None:
    result = _federate(
        digits_bundle, tmp_path, 3, (_stall_partition(0, 40.0),),
        # Long enough for the first round's set-up on a busy machine, short of the stall.
        **{"num-rounds": 1, "round-timeout": 30.0, "personal-epochs": 0},
    )  # fmt: skip
    (only,) = result["rounds"]
    assert (only["replies"], only["missing"], only["skipped"]) == (2, 1, False)
    assert only["seconds"] < 39  # the round went ahead before the stalled client was back


def test_too_few_replies_skip_the_round_and_keep_the_adapter(
    digits_bundle: Path, tmp_path: Path
) -> None:
    result = _federate(
        digits_bundle, tmp_path, 2, (_fail_partition(1),),
        **{"num-rounds": 1, "personal-epochs": 0},
    )  # fmt: skip
    (only,) = result["rounds"]
    assert (only["replies"], only["failures"], only["skipped"]) == (1, 1, True)
    assert result["global_accuracy"] == result["frozen_accuracy"]


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [
        ("ffa", {}),
        ("hetlora", {"ranks": "2,4"}),
        ("flora", {"ranks": "2,4"}),
        ("fedit", {"server-momentum": 0.5}),
        ("fedit", {"proximal-mu": 0.1}),
        ("fedit", {"dp": "server-fixed", "dp-noise": 0.01}),
        ("fedit", {"dp": "client-fixed", "dp-noise": 0.01}),
        ("ffa", {"head-targets": "auto"}),
        # Head only, over two rounds: the second merges round one's stack into the head.
        ("flora", {"ranks": "2,4", "head-targets": "body.0.0", "targets": "none", "num-rounds": 2}),
    ],
)
def test_each_strategy_runs_a_round(
    digits_bundle: Path, tmp_path: Path, strategy: str, extra: dict[str, Any]
) -> None:
    result = _federate(
        digits_bundle, tmp_path, 2, strategy=strategy,
        **{"num-rounds": 1, "personal-epochs": 0, **extra},
    )  # fmt: skip
    for one in result["rounds"]:
        assert (one["replies"], one["failures"], one["skipped"]) == (2, 0, False)
        ranks = sorted(c["rank"] for c in one["clients"])
        assert ranks == ([2, 4] if "ranks" in extra else [4, 4])
        if strategy == "ffa":  # only B travels up: a fraction of what fedit sends
            assert all(c["bytes_up"] < 0.3 * c["bytes_down"] for c in one["clients"])
        assert all(c["bytes_up"] <= 0.02 * result["tail_fp32_bytes"] for c in one["clients"])
    head = [t for t in result["targets"] if t.startswith("head.")]
    assert head == {"auto": ["head.body.0.0", "head.body.1.0"], "body.0.0": ["head.body.0.0"],
                    None: []}[extra.get("head-targets")]  # fmt: skip
    tail = [t for t in result["targets"] if not t.startswith("head.")]
    assert bool(tail) == (extra.get("targets") != "none")
