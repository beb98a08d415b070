"""Tests for tandem.policy: the latency model, the choice rules, validation, stdlib-only import."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tandem.policy import Decision, LinkState, Option, SplitPolicy

ROOT = Path(__file__).resolve().parents[1]

# Shaped like a real bundle's table: accuracy and size both fall with width and bits.
TABLE: list[dict[str, Any]] = [
    {"width": 1.0, "bits": 8, "accuracy": 0.97, "bytes_per_sample": 4000.0},
    {"width": 1.0, "bits": 4, "accuracy": 0.96, "bytes_per_sample": 2000.0},
    {"width": 0.5, "bits": 8, "accuracy": 0.95, "bytes_per_sample": 2000.0},
    {"width": 0.5, "bits": 4, "accuracy": 0.94, "bytes_per_sample": 1000.0},
    {"width": 0.25, "bits": 4, "accuracy": 0.90, "bytes_per_sample": 500.0},
    {"width": 0.25, "bits": 2, "accuracy": 0.85, "bytes_per_sample": 250.0},
]
HEAD_MS = {0.25: 2.0, 0.5: 3.0, 1.0: 5.0}

FAST = LinkState(rtt_ms=10.0, uplink_bps=100e6, downlink_bps=100e6)
# 200 kbit/s: 0.04 ms per byte, so 250 bytes take 10 ms and 4000 bytes 160 ms.
SLOW = LinkState(rtt_ms=20.0, uplink_bps=200e3)


def _policy(slo_ms: float = 60.0, **kwargs: Any) -> SplitPolicy:
    return SplitPolicy.from_table(TABLE, slo_ms, HEAD_MS, **kwargs)


def _opt(width: float = 0.5, bits: int = 4, accuracy: float = 0.9, nbytes: float = 100) -> Option:
    return Option(width=width, bits=bits, accuracy=accuracy, bytes_per_sample=nbytes)


def test_predict_ms_follows_the_latency_model() -> None:
    policy = _policy(server_ms=7.0, response_bytes=100)
    option = _opt(width=0.5, nbytes=1000)
    link = LinkState(rtt_ms=30.0, uplink_bps=1e6, downlink_bps=2e5)
    # head 3 + rtt 30 + 1000 B at 1 Mbit/s (8 ms) + 100 B at 200 kbit/s (4 ms) + server 7
    assert policy.predict_ms(option, link) == pytest.approx(52.0)
    # No link: the prior (50 ms, 1 Mbit/s both ways).
    assert policy.predict_ms(option) == pytest.approx(3 + 50 + 8 + 0.8 + 7)


def test_most_accurate_option_when_bandwidth_is_plentiful() -> None:
    d = _policy().decide(FAST)
    assert (d.width, d.bits, d.local, d.meets_slo) == (1.0, 8, False, True)
    assert d.predicted_ms == pytest.approx(5 + 10 + 4000 * 8 / 100e6 * 1000 + 64 * 8 / 100e6 * 1000)
    assert d.reason == "best accuracy within 60 ms"


def test_smaller_width_and_bits_when_bandwidth_is_low() -> None:
    d = _policy().decide(SLOW)
    # 0.5/4 would take 3 + 20 + 40 = 63 ms; 0.25/4 takes 2 + 20 + 20 = 42 ms.
    assert (d.width, d.bits, d.local, d.meets_slo) == (0.25, 4, False, True)
    assert d.predicted_ms == pytest.approx(42.0)


def test_a_looser_slo_buys_accuracy() -> None:
    d = _policy(slo_ms=63.0).decide(SLOW)
    assert (d.width, d.bits, d.meets_slo) == (0.5, 4, True)
    assert d.reason == "best accuracy within 63 ms"


def test_fastest_option_when_nothing_meets_the_slo() -> None:
    d = _policy(slo_ms=10.0).decide(SLOW)
    assert (d.width, d.bits, d.local, d.meets_slo) == (0.25, 2, False, False)
    assert d.predicted_ms == pytest.approx(2 + 20 + 10)
    assert d.reason == "no option meets the SLO: fastest"


def test_local_when_nothing_meets_the_slo_and_local_is_faster() -> None:
    d = _policy(slo_ms=10.0, local_ms=25.0).decide(SLOW)
    assert d == Decision(None, None, True, 25.0, False, "no option meets the SLO: local is faster")
    # Local within the SLO: it is chosen and meets it.
    d = _policy(slo_ms=30.0, local_ms=25.0).decide(SLOW)
    assert d.local and d.meets_slo


def test_cloud_when_local_is_not_strictly_faster() -> None:
    for local_ms in (32.0, 40.0):  # the fastest option predicts 32 ms
        d = _policy(slo_ms=10.0, local_ms=local_ms).decide(SLOW)
        assert (d.width, d.bits, d.local) == (0.25, 2, False)


def test_no_local_when_an_option_meets_the_slo() -> None:
    # Local would be faster, but its accuracy is unknown and an option fits: stay split.
    d = _policy(local_ms=1.0).decide(SLOW)
    assert (d.width, d.bits, d.local, d.meets_slo) == (0.25, 4, False, True)


def test_local_fallback_when_the_cloud_is_down() -> None:
    d = _policy(local_ms=45.0).decide(FAST, cloud_up=False)
    assert d == Decision(None, None, True, 45.0, True, "cloud unreachable: local fallback")
    d = _policy(local_ms=80.0).decide(FAST, cloud_up=False)
    assert d.local and not d.meets_slo


def test_cloud_down_without_local_model_names_the_best_option() -> None:
    policy = _policy()
    up = policy.decide(SLOW)
    down = policy.decide(SLOW, cloud_up=False)
    assert (down.width, down.bits, down.local) == (up.width, up.bits, False)
    assert down.predicted_ms == up.predicted_ms
    assert not down.meets_slo
    assert down.reason.startswith("cloud unreachable")


def test_no_link_estimate_uses_the_prior() -> None:
    prior = LinkState(rtt_ms=20.0, uplink_bps=200e3)
    policy = _policy(prior=prior)
    assert policy.prior == prior
    assert policy.decide(None) == policy.decide(prior)
    # The default prior, 50 ms and 1 Mbit/s: 0.25/4 takes 2 + 50 + 4 + 0.512 ms, 0.5/4 61.5 ms.
    d = _policy().decide(None)
    assert (d.width, d.bits) == (0.25, 4)
    assert d.predicted_ms == pytest.approx(56.512)


def test_accuracy_ties_go_to_fewer_bytes_then_lower_latency() -> None:
    head = {0.25: 1.0, 0.5: 9.0, 1.0: 2.0}
    options = [
        _opt(width=1.0, bits=8, accuracy=0.9, nbytes=300),
        _opt(width=0.5, bits=8, accuracy=0.9, nbytes=200),  # fewest bytes, slowest head
        _opt(width=0.25, bits=8, accuracy=0.9, nbytes=200),  # fewest bytes, fastest head
        _opt(width=0.25, bits=2, accuracy=0.8, nbytes=10),
    ]
    for order in (options, options[::-1]):
        d = SplitPolicy(order, 100.0, head).decide(FAST)
        assert (d.width, d.bits) == (0.25, 8)


def test_complete_ties_do_not_depend_on_option_order() -> None:
    head = {0.25: 1.0, 0.5: 1.0}
    options = [_opt(width=0.5, bits=4), _opt(width=0.25, bits=8), _opt(width=0.25, bits=4)]
    decisions = {SplitPolicy(o, 100.0, head).decide(FAST) for o in (options, options[::-1])}
    assert len(decisions) == 1
    (d,) = decisions
    assert (d.width, d.bits) == (0.25, 4)


def test_fastest_ties_go_to_accuracy() -> None:
    head = {0.5: 1.0, 1.0: 1.0}
    options = [_opt(width=0.5, accuracy=0.7, nbytes=100), _opt(width=1.0, accuracy=0.8, nbytes=100)]
    d = SplitPolicy(options, 1.0, head).decide(SLOW)
    assert (d.width, d.meets_slo) == (1.0, False)


def test_decisions_are_deterministic() -> None:
    policy = _policy(local_ms=30.0)
    for link in (FAST, SLOW, None):
        assert policy.decide(link) == policy.decide(link)


def test_server_time_updates_predictions() -> None:
    policy = _policy()
    before = policy.predict_ms(policy.options[0], FAST)
    policy.set_server_ms(12.5)
    assert policy.server_ms == 12.5
    assert policy.predict_ms(policy.options[0], FAST) == pytest.approx(before + 12.5)
    # 20 ms of server time pushes 0.25/4 (42 ms) past the SLO: 0.25/2 is 32 + 20 = 52 ms.
    policy.set_server_ms(20.0)
    d = policy.decide(SLOW)
    assert (d.width, d.bits) == (0.25, 2)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="server_ms"):
            policy.set_server_ms(bad)
    assert policy.server_ms == 20.0


def test_zero_bandwidth_reads_as_an_outage() -> None:
    dead = LinkState(rtt_ms=10.0, uplink_bps=0.0)
    d = _policy().decide(dead)
    assert not d.meets_slo and math.isinf(d.predicted_ms)
    assert _policy(local_ms=500.0).decide(dead).local


# Rate points of the entropy model, as a format-2 manifest lists them (bits null).
ENTROPY: list[dict[str, Any]] = [
    {"width": 0.5, "codec": "entropy", "bits": None, "point": 0, "accuracy": 0.95,
     "bytes_per_sample": 600.0},
    {"width": 0.25, "codec": "entropy", "bits": None, "point": 1, "accuracy": 0.90,
     "bytes_per_sample": 150.0},
]  # fmt: skip


def test_rate_points_are_options_and_win_where_they_are_smaller() -> None:
    """Entropy rows become options naming their rate point; at equal accuracy the policy
    takes the point with fewer bytes, and the decision names the point, not bits."""
    policy = SplitPolicy.from_table([*TABLE, *ENTROPY], 60.0, HEAD_MS)
    assert Option(0.25, None, 0.90, 150.0, point=1) in policy.options
    # 200 kbit/s: width 0.5 at 8 bits (2000 B) misses 60 ms; its rate point (600 B) fits.
    d = policy.decide(SLOW)
    assert (d.width, d.bits, d.point) == (0.5, None, 0)
    assert d.meets_slo
    # Plenty of bandwidth: the most accurate option, a quantise+zstd one.
    d = policy.decide(FAST)
    assert (d.width, d.bits, d.point) == (1.0, 8, None)
    # Cloud down without a local model: the decision still names the point to queue with.
    down = policy.decide(SLOW, cloud_up=False)
    assert (down.point, down.local, down.meets_slo) == (0, False, False)


def test_a_rate_point_and_bits_of_the_same_number_are_different_options() -> None:
    both = [Option(0.5, 2, 0.9, 100.0), Option(0.5, None, 0.9, 100.0, point=2)]
    policy = SplitPolicy(both, 50.0, {0.5: 1.0})
    # A complete tie goes to the quantise+zstd codec, whatever the order.
    assert policy.decide(FAST).bits == 2
    assert SplitPolicy(both[::-1], 50.0, {0.5: 1.0}).decide(FAST).bits == 2


def test_from_table_reads_a_manifest_table() -> None:
    rows = json.loads(json.dumps(TABLE))
    rows[0]["bits"] = 8.0  # some JSON writers emit integral floats
    policy = SplitPolicy.from_table(rows, 60.0, HEAD_MS, server_ms=1.0, local_ms=9.0)
    assert policy.options[0] == Option(1.0, 8, 0.97, 4000.0)
    assert isinstance(policy.options[0].bits, int)
    assert len(policy.options) == len(TABLE)
    assert (policy.slo_ms, policy.server_ms, policy.local_ms) == (60.0, 1.0, 9.0)
    # Extra keys (a manifest may grow) are ignored.
    SplitPolicy.from_table([{**TABLE[0], "note": "x"}], 60.0, HEAD_MS)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"width": 1.0, "bits": 8, "accuracy": 0.9}], "row 0 lacks bytes_per_sample"),
        ([TABLE[0], {"bits": 8, "accuracy": 0.9}], "row 1 lacks width, bytes_per_sample"),
        ([{**TABLE[0], "bits": 4.5}], "row 0: bits must be an integer"),
        ([{**TABLE[0], "bits": "8"}], "row 0: bits must be an integer"),
        ([{**TABLE[0], "accuracy": "high"}], "row 0: accuracy must be a number"),
        ([{**TABLE[0], "accuracy": 1.5}], r"row 0: accuracy must be in \[0, 1\]"),
        ([[1.0, 8, 0.9, 10]], "row 0 is not a mapping"),
        ([{**ENTROPY[0], "point": None}], "row 0: point must be an integer"),
        ([{k: v for k, v in ENTROPY[0].items() if k != "point"}], "row 0 lacks point"),
        ([], "options must not be empty"),
    ],
)
def test_from_table_rejects_bad_rows(rows: list[Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SplitPolicy.from_table(rows, 60.0, HEAD_MS)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"options": []}, "options must not be empty"),
        ({"options": [("a",)]}, "Option instances"),
        ({"options": [_opt(), _opt(accuracy=0.5)]}, "duplicate option"),
        ({"slo_ms": 0.0}, "slo_ms must be finite and > 0"),
        ({"slo_ms": -5.0}, "slo_ms must be finite and > 0"),
        ({"slo_ms": math.inf}, "slo_ms must be finite and > 0"),
        ({"slo_ms": math.nan}, "slo_ms must not be NaN"),
        ({"head_ms": {1.0: 1.0}}, r"head_ms has no time for width\(s\) \[0.5\]"),
        ({"head_ms": {0.5: -1.0}}, r"head_ms\[0.5\] must be >= 0"),
        ({"head_ms": {0.5: math.nan}}, "must not be NaN"),
        ({"head_ms": {"wide": 1.0}}, "not a width"),
        ({"server_ms": -1.0}, "server_ms must be >= 0"),
        ({"server_ms": math.inf}, "server_ms must be finite"),
        ({"response_bytes": -1}, "response_bytes must be >= 0"),
        ({"local_ms": -1.0}, "local_ms must be >= 0"),
        ({"local_ms": math.nan}, "local_ms must not be NaN"),
        ({"prior": "fast"}, "prior must be a LinkState"),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"options": [_opt()], "slo_ms": 50.0, "head_ms": {0.5: 1.0}, **kwargs}
    with pytest.raises(ValueError, match=match):
        SplitPolicy(args.pop("options"), args.pop("slo_ms"), args.pop("head_ms"), **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0.0}, r"width must be in \(0, 1\]"),
        ({"width": 1.5}, r"width must be in \(0, 1\]"),
        ({"width": math.nan}, "width must not be NaN"),
        ({"bits": 0}, "bits must be a positive integer"),
        ({"bits": 4.0}, "bits must be a positive integer"),
        ({"bits": True}, "bits must be a positive integer"),
        ({"bits": None}, "exactly one"),
        ({"point": 0}, "exactly one"),
        ({"bits": None, "point": -1}, "point must be a non-negative integer"),
        ({"bits": None, "point": 1.0}, "point must be a non-negative integer"),
        ({"accuracy": -0.1}, "accuracy must be >= 0"),
        ({"accuracy": 1.01}, r"accuracy must be in \[0, 1\]"),
        ({"bytes_per_sample": -1.0}, "bytes_per_sample must be >= 0"),
        ({"bytes_per_sample": math.inf}, "bytes_per_sample must be finite"),
    ],
)
def test_option_validation(kwargs: dict[str, Any], match: str) -> None:
    fields: dict[str, Any] = {"width": 0.5, "bits": 4, "accuracy": 0.9, "bytes_per_sample": 10.0}
    with pytest.raises(ValueError, match=match):
        Option(**{**fields, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rtt_ms": -1.0}, "rtt_ms must be >= 0"),
        ({"rtt_ms": math.inf}, "rtt_ms must be finite"),
        ({"uplink_bps": -1.0}, "uplink_bps must be >= 0"),
        ({"uplink_bps": math.nan}, "uplink_bps must not be NaN"),
        ({"downlink_bps": -1.0}, "downlink_bps must be >= 0"),
    ],
)
def test_link_state_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LinkState(**{"rtt_ms": 10.0, "uplink_bps": 1e6, **kwargs})


def test_predict_ms_rejects_an_unknown_width() -> None:
    with pytest.raises(ValueError, match=r"no time for width 0\.75"):
        _policy().predict_ms(_opt(width=0.75), FAST)


def test_policy_imports_only_the_standard_library() -> None:
    heavy = "{'numpy', 'torch', 'grpc', 'pydantic'}"
    code = (
        "import sys; import tandem.policy; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
