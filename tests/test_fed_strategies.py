"""Aggregation of LoRA adapters by each strategy, on hand-made replies (no Flower runtime)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from tandem.federated.config import FedConfig
from tandem.federated.rank import concat_ranks, scale_b
from tandem.federated.strategies import FfaLora, FLoRA, HetLora, LoraStrategy, build_strategy
from tandem.federated.updates import ARRAYS_KEY, METRICS_KEY, from_record, to_record

Arrays = dict[str, np.ndarray]


@pytest.fixture(autouse=True)
def _run_identity() -> Iterator[None]:
    """Flower builds messages only inside a run; these tests stand in for one."""
    saved = TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def _adapter(rank: int, value: float) -> Arrays:
    return {
        "fc.lora_A": np.full((rank, 5), value, np.float32),
        "fc.lora_B": np.full((3, rank), value, np.float32),
    }


def _reply(arrays: Arrays, examples: int) -> Message:
    """A reply's content, as the rounds hand it to a strategy after decoding."""
    metrics = MetricRecord({"num-examples": examples})
    content = RecordDict({ARRAYS_KEY: to_record(arrays), METRICS_KEY: metrics})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


def _cfg(**values: object) -> FedConfig:
    return FedConfig.from_run_config({"bundle": "b", **values})


def _delta(arrays: Arrays) -> np.ndarray:
    return arrays["fc.lora_B"].astype(np.float64) @ arrays["fc.lora_A"]


def test_fedit_is_an_example_weighted_mean_of_a_and_b() -> None:
    strategy = build_strategy(_cfg(), _adapter(4, 0.0))
    assert type(strategy) is LoraStrategy
    replies = [_reply(_adapter(4, 1.0), 30), _reply(_adapter(4, 3.0), 10)]
    arrays, _ = strategy.aggregate(1, to_record(_adapter(4, 0)), replies)
    assert arrays is not None
    out = from_record(arrays)
    np.testing.assert_allclose(out["fc.lora_A"], 1.5)  # (30 * 1 + 10 * 3) / 40
    np.testing.assert_allclose(out["fc.lora_B"], 1.5)


def test_ffa_trains_and_averages_only_b_and_keeps_a() -> None:
    initial = _adapter(4, 0.5)
    strategy = build_strategy(_cfg(strategy="ffa"), initial)
    assert isinstance(strategy, FfaLora)
    only_b = {"fc.lora_B": np.full((3, 4), 2.0, np.float32)}
    arrays, _ = strategy.aggregate(1, to_record({"fc.lora_B": initial["fc.lora_B"]}),
                                   [_reply(only_b, 5), _reply(only_b, 5)])  # fmt: skip
    assert arrays is not None and set(from_record(arrays)) == {"fc.lora_B"}
    full = strategy.global_adapter(arrays)
    np.testing.assert_array_equal(full["fc.lora_A"], initial["fc.lora_A"])
    np.testing.assert_allclose(full["fc.lora_B"], 2.0)


def test_hetlora_zero_pads_lower_ranks_before_averaging() -> None:
    strategy = build_strategy(_cfg(strategy="hetlora", ranks="2,4"), _adapter(4, 0.0))
    assert isinstance(strategy, HetLora)
    replies = [_reply(_adapter(2, 2.0), 10), _reply(_adapter(4, 4.0), 10)]
    arrays, _ = strategy.aggregate(1, to_record(_adapter(4, 0)), replies)
    assert arrays is not None
    a = from_record(arrays)["fc.lora_A"]
    np.testing.assert_allclose(a[:2], 3.0)  # both clients trained these components
    np.testing.assert_allclose(a[2:], 2.0)  # only the rank-4 client: (0 + 4) / 2


def test_flora_stacks_the_weighted_deltas_exactly() -> None:
    cfg = _cfg(strategy="flora", ranks="2,3", alpha=6.0)
    strategy = build_strategy(cfg, _adapter(3, 0.1))
    assert isinstance(strategy, FLoRA) and strategy.scale == 1.0
    rng = np.random.default_rng(0)
    one = {"fc.lora_A": rng.normal(size=(2, 5)).astype(np.float32),
           "fc.lora_B": rng.normal(size=(3, 2)).astype(np.float32)}  # fmt: skip
    two = {"fc.lora_A": rng.normal(size=(3, 5)).astype(np.float32),
           "fc.lora_B": rng.normal(size=(3, 3)).astype(np.float32)}  # fmt: skip
    arrays, _ = strategy.aggregate(1, to_record({}), [_reply(one, 30), _reply(two, 10)])
    assert arrays is not None
    client_scale = 6.0 / 3  # alpha over the largest rank
    want = client_scale * (0.75 * _delta(one) + 0.25 * _delta(two))
    np.testing.assert_allclose(_delta(from_record(arrays)), want, rtol=1e-4, atol=1e-5)
    # A second round stacks onto the first.
    again, _ = strategy.aggregate(2, arrays, [_reply(one, 1)])
    assert again is not None
    expected = _delta(concat_ranks([from_record(arrays), scale_b(one, client_scale)]))
    np.testing.assert_allclose(_delta(from_record(again)), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("values", "inner"),
    [
        ({"server-momentum": 0.9}, "FedAvgM"),
        ({"proximal-mu": 0.1}, "FedProx"),
        ({"dp": "server-fixed"}, "DifferentialPrivacyServerSideFixedClipping"),
        ({"dp": "server-adaptive"}, "DifferentialPrivacyServerSideAdaptiveClipping"),
        ({"dp": "client-fixed"}, "DifferentialPrivacyClientSideFixedClipping"),
        ({}, "FedAvg"),
    ],
)
def test_config_picks_flowers_strategy(values: dict[str, object], inner: str) -> None:
    strategy = build_strategy(_cfg(**values), _adapter(4, 0.0))
    assert type(strategy.inner).__name__ == inner
