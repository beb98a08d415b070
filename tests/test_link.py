"""Tests for tandem.link: recovering RTT and bandwidth from synthetic requests."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from tandem.link import LinkEstimator
from tandem.policy import LinkState


def _feed(
    est: LinkEstimator,
    rng: random.Random,
    n: int,
    *,
    rtt_ms: float,
    bps: float,
    sizes: tuple[int, int] = (50, 5000),
    noise_ms: float = 2.0,
    spike_rate: float = 0.0,
) -> None:
    """``n`` requests over a link with ``rtt_ms`` and ``bps``, plus queueing delay (exponential,
    mean ``noise_ms``) and, at ``spike_rate``, a 50-200 ms stall. Each also spends a random
    time on the server, which the estimator has to take off."""
    for _ in range(n):
        up = rng.randint(*sizes)
        down = 32
        net = rtt_ms + (up + down) * 8 / bps * 1000 + rng.expovariate(1 / noise_ms)
        if rng.random() < spike_rate:
            net += rng.uniform(50, 200)
        server = rng.uniform(1.0, 10.0)
        est.observe(up, down, net + server, server)


def _state(est: LinkEstimator) -> LinkState:
    state = est.state()
    assert state is not None
    return state


def test_no_state_before_data() -> None:
    est = LinkEstimator()
    assert est.state() is None
    assert est.samples == 0


@pytest.mark.parametrize("seed", range(5))
def test_recovers_rtt_and_bandwidth(seed: int) -> None:
    est = LinkEstimator()
    _feed(est, random.Random(seed), 200, rtt_ms=40.0, bps=2e6)
    state = _state(est)
    assert est.samples == 200
    assert state.rtt_ms == pytest.approx(40.0, rel=0.1)
    assert state.uplink_bps == pytest.approx(2e6, rel=0.1)
    # Bytes were counted both ways, so both directions report the same bandwidth.
    assert state.downlink_bps == state.uplink_bps


def test_occasional_stalls_do_not_skew_the_estimate() -> None:
    est = LinkEstimator()
    _feed(est, random.Random(7), 300, rtt_ms=40.0, bps=2e6, noise_ms=1.0, spike_rate=0.05)
    state = _state(est)
    assert state.rtt_ms == pytest.approx(40.0, rel=0.1)
    assert state.uplink_bps == pytest.approx(2e6, rel=0.15)


@pytest.mark.parametrize("seed", range(6))
def test_heavy_queueing_does_not_inflate_rtt(seed: int) -> None:
    est = LinkEstimator()
    # Mean queueing delay equal to the RTT: an average would read about 80 ms, the floor is 40.
    # Noise this heavy blurs the bandwidth, and the RTT with it, so the bound is looser.
    _feed(est, random.Random(seed), 300, rtt_ms=40.0, bps=2e6, noise_ms=40.0)
    assert _state(est).rtt_ms == pytest.approx(40.0, rel=0.2)


def test_tracks_a_path_that_gets_slower() -> None:
    rng = random.Random(11)
    est = LinkEstimator(window=64)
    _feed(est, rng, 200, rtt_ms=40.0, bps=2e6)
    # A handful of slow samples cannot lift the floor while the fast ones are in the window.
    _feed(est, rng, 10, rtt_ms=80.0, bps=1e6)
    assert _state(est).rtt_ms < 50.0
    # Once the window has rolled over (and the EWMA settled), the new path is what it reports.
    _feed(est, rng, 64 + 40, rtt_ms=80.0, bps=1e6)
    state = _state(est)
    assert state.rtt_ms == pytest.approx(80.0, rel=0.1)
    assert state.uplink_bps == pytest.approx(1e6, rel=0.1)


def test_tracks_a_path_that_gets_faster() -> None:
    rng = random.Random(12)
    est = LinkEstimator(window=64)
    _feed(est, rng, 200, rtt_ms=80.0, bps=1e6)
    _feed(est, rng, 64 + 40, rtt_ms=20.0, bps=4e6)
    state = _state(est)
    assert state.rtt_ms == pytest.approx(20.0, rel=0.1)
    assert state.uplink_bps == pytest.approx(4e6, rel=0.1)


@pytest.mark.parametrize(
    "sample",
    [
        (-1, 0, 10.0, 0.0),
        (10, -1, 10.0, 0.0),
        (10, 0, -1.0, 0.0),
        (10, 0, math.nan, 0.0),
        (10, 0, math.inf, 0.0),
        (10, 0, 10.0, -1.0),
        (10, 0, 10.0, math.nan),
        (math.nan, 0, 10.0, 0.0),
        ("10", 0, 10.0, 0.0),
        (None, 0, 10.0, 0.0),
    ],
)
def test_invalid_samples_are_ignored(sample: tuple[Any, Any, Any, Any]) -> None:
    est = LinkEstimator()
    est.observe(*sample)
    assert est.samples == 0
    assert est.state() is None
    # Nor do they disturb an estimate in progress.
    clean, dirty = LinkEstimator(), LinkEstimator()
    rng_clean, rng_dirty = random.Random(5), random.Random(5)
    _feed(clean, rng_clean, 50, rtt_ms=30.0, bps=1e6)
    _feed(dirty, rng_dirty, 25, rtt_ms=30.0, bps=1e6)
    dirty.observe(*sample)
    _feed(dirty, rng_dirty, 25, rtt_ms=30.0, bps=1e6)
    assert dirty.samples == clean.samples == 50
    assert dirty.state() == clean.state()


def test_server_time_longer_than_elapsed_clamps_to_zero() -> None:
    est = LinkEstimator()
    est.observe(100, 10, 5.0, server_ms=8.0)
    assert est.samples == 1
    state = _state(est)
    assert state.rtt_ms == 0.0
    assert math.isfinite(state.uplink_bps) and state.uplink_bps > 0


def test_tiny_constant_payloads_give_a_finite_bandwidth() -> None:
    est = LinkEstimator(default_bps=1e6)
    rng = random.Random(2)
    for _ in range(200):
        est.observe(100, 20, 30.0 + rng.expovariate(1 / 3.0))
    state = _state(est)
    # Round trip and transfer cannot be told apart: the bandwidth stays at the default...
    assert state.uplink_bps == pytest.approx(1e6)
    # ...and the RTT absorbs the rest, so the prediction at this size matches the floor.
    assert state.rtt_ms + 120 * 8 / state.uplink_bps * 1000 == pytest.approx(30.0, abs=0.5)


def test_a_default_the_data_contradicts_is_raised() -> None:
    # 10 kB in 40 ms cannot have crossed a 100 kbit/s link (that alone would take 800 ms).
    est = LinkEstimator(default_bps=1e5)
    for _ in range(20):
        est.observe(10_000, 0, 40.0)
    state = _state(est)
    assert state.uplink_bps >= 10_000 * 8 / 40.0 * 1000
    assert state.rtt_ms + 10_000 * 8 / state.uplink_bps * 1000 <= 40.0 + 1e-9


def test_estimates_depend_only_on_the_observations() -> None:
    a, b = LinkEstimator(), LinkEstimator()
    rng_a, rng_b = random.Random(9), random.Random(9)
    _feed(a, rng_a, 100, rtt_ms=25.0, bps=3e6)
    for _ in range(100):  # b is asked after every request; a only at the end
        _feed(b, rng_b, 1, rtt_ms=25.0, bps=3e6)
        b.state()
    assert a.state() == b.state()


def test_reset_forgets_everything() -> None:
    est = LinkEstimator()
    _feed(est, random.Random(1), 20, rtt_ms=25.0, bps=3e6)
    est.reset()
    assert est.samples == 0
    assert est.state() is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 2}, "window must be an integer >= 3"),
        ({"window": 8.0}, "window must be an integer >= 3"),
        ({"alpha": 0.0}, r"alpha must be in \(0, 1\]"),
        ({"alpha": 1.5}, r"alpha must be in \(0, 1\]"),
        ({"default_bps": 0.0}, "default_bps must be finite and > 0"),
        ({"default_bps": math.inf}, "default_bps must be finite and > 0"),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LinkEstimator(**kwargs)
