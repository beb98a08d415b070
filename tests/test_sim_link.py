"""Tests for sim.link: the trace-driven link model (FIFO queue, delay, jitter, loss)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tandem.sim.link import Link, transfer_s
from tandem.sim.traces import (
    PACKET_BYTES,
    Trace,
    constant,
    on_off,
    random_walk,
    read_mahimahi,
    read_trace,
    steps,
)

TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"


def _mahimahi(tmp_path: Path, seed: int = 0, period_ms: int = 500, n: int = 400) -> Trace:
    """A random Mahimahi trace: ``n`` opportunities in ``period_ms`` (several per ms, some at 0)."""
    rng = np.random.default_rng(seed)
    ms = np.sort(rng.integers(0, period_ms, n))
    ms[-1] = period_ms
    path = tmp_path / f"mm-{seed}"
    path.write_text("".join(f"{m}\n" for m in ms))
    return read_mahimahi(path)


def _workload(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Bursty send times (ties included) and sizes (zeros included)."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(0.02, n)
    gaps[rng.random(n) < 0.2] = 0.0
    sizes = rng.integers(0, 40_000, n)
    sizes[::17] = 0
    return np.cumsum(gaps), sizes


# ------------------------------------------------------------------------------ basic timing


def test_one_megabyte_at_one_megabyte_per_second() -> None:
    trace = constant(8.0)
    assert Link(trace, 0.01).send(0.0, 1_000_000) == pytest.approx(1.01)
    assert transfer_s(trace, 0.0, 1_000_000, 0.01) == pytest.approx(1.01)
    assert transfer_s(trace, 0.0, 250_000) == pytest.approx(0.25)


def test_fifo_queueing() -> None:
    """A transfer sent while another is on the wire starts when that one is done."""
    link = Link(constant(8.0), 0.01)
    first = link.send(0.0, 1_000_000)
    second = link.send(0.0, 500_000)
    assert first == pytest.approx(1.01)
    assert second - first == pytest.approx(0.5)
    # sent mid-way through the queue: still waits for both before it
    assert link.send(1.2, 250_000) == pytest.approx(1.75 + 0.01)


def test_idle_capacity_is_not_banked() -> None:
    trace = constant(8.0)
    assert Link(trace, 0.01).send(10.0, 1_000_000) == pytest.approx(11.01)
    assert transfer_s(trace, 10.0, 1_000_000, 0.01) == pytest.approx(
        transfer_s(trace, 0.0, 10**6, 0.01)
    )
    link = Link(trace)
    assert link.send(0.0, 1_000_000) == pytest.approx(1.0)
    # 4 s of idle capacity do not let the next megabyte through any faster
    assert link.send(5.0, 1_000_000) == pytest.approx(6.0)


def test_fresh_link_matches_transfer_s_on_mahimahi(tmp_path: Path) -> None:
    trace = _mahimahi(tmp_path)
    rng = np.random.default_rng(1)
    for t, n in zip(rng.uniform(0, 3, 50), rng.integers(1, 200_000, 50), strict=True):
        arrival = Link(trace, 0.03).send(float(t), int(n))
        assert arrival - t == pytest.approx(transfer_s(trace, float(t), int(n), 0.03), abs=1e-12)
        assert arrival >= t + 0.03


def test_on_off_transfer_waits_out_the_outage() -> None:
    trace = on_off(8.0, 1.0, 1.0)
    assert Link(trace).send(0.0, 1_000_000) == pytest.approx(1.0)
    assert Link(trace).send(0.0, 1_000_000 + PACKET_BYTES) == pytest.approx(2.0015)
    assert Link(trace).send(1.5, 1000) == pytest.approx(2.001)  # sent during the outage
    assert transfer_s(trace, 1.5, 1000) == pytest.approx(0.501)


def test_zero_byte_sends() -> None:
    trace = constant(8.0)
    assert Link(trace, 0.02).send(3.0, 0) == pytest.approx(3.02)
    assert transfer_s(trace, 3.0, 0, 0.02) == 0.02
    link = Link(trace, 0.02)
    big = link.send(0.0, 1_000_000)
    empty = link.send(0.1, 0)
    assert big <= empty <= 0.1 + 0.02 + big  # never overtakes the transfer before it
    assert empty == pytest.approx(big)
    # and it takes no capacity: the next megabyte queues behind the first one only
    assert link.send(0.2, 1_000_000) == pytest.approx(2.02)


def test_zero_byte_sends_lose_nothing() -> None:
    link = Link(constant(8.0), 0.05, loss=0.9, seed=1)
    for i in range(50):
        assert link.send(float(i), 0) == pytest.approx(i + 0.05)


def test_empty_send_many() -> None:
    link = Link(constant(8.0), 0.01)
    out = link.send_many(np.array([]), np.array([]))
    assert out.shape == (0,)
    assert link.send(0.0, 1_000_000) == pytest.approx(1.01)


# ----------------------------------------------------------------- ordering and equivalence


def test_arrivals_never_decrease_with_jitter(tmp_path: Path) -> None:
    times, sizes = _workload(2)
    trace = _mahimahi(tmp_path)
    plain = Link(trace, 0.02).send_many(times, sizes)
    jittery = Link(trace, 0.02, jitter_s=0.05, seed=3).send_many(times, sizes)
    assert np.all(np.diff(jittery) >= 0)
    assert np.all(jittery >= plain)
    assert np.mean(jittery - plain) > 0.01  # jitter did something


def test_jitter_adds_half_normal_delay() -> None:
    """Spaced, tiny transfers: each arrival is late by |N(0, jitter)|, mean jitter*sqrt(2/pi)."""
    times = np.arange(2000, dtype=np.float64)
    sizes = np.full(2000, 100)
    base = Link(constant(8.0), 0.01).send_many(times, sizes)
    late = Link(constant(8.0), 0.01, jitter_s=0.01, seed=5).send_many(times, sizes) - base
    assert late.min() >= 0
    assert late.mean() == pytest.approx(0.01 * math.sqrt(2 / math.pi), rel=0.1)


TRACE_MAKERS: dict[str, Callable[[Path], Trace]] = {
    "mahimahi": _mahimahi,
    "constant": lambda _: constant(8.0),
    "on_off": lambda _: on_off(8.0, 1.0, 0.5),
}


@pytest.mark.parametrize("kind", sorted(TRACE_MAKERS))
def test_send_many_equals_successive_sends(tmp_path: Path, kind: str) -> None:
    trace = TRACE_MAKERS[kind](tmp_path)
    times, sizes = _workload(4)
    batch = Link(trace, 0.01, jitter_s=0.005, loss=0.05, seed=3)
    one = Link(trace, 0.01, jitter_s=0.005, loss=0.05, seed=3)
    many = batch.send_many(times, sizes)
    each = np.array([one.send(float(t), int(s)) for t, s in zip(times, sizes, strict=True)])
    np.testing.assert_array_equal(many, each)
    # and both links end in the same state
    assert batch.send(times[-1], 5000) == one.send(times[-1], 5000)


@pytest.mark.parametrize(
    "trace",
    [steps([1.0, 5.0, 0.5, 3.0], 0.7), random_walk(3.0, 1.0, 0.5, 30.0, seed=2)],
    ids=["steps", "walk"],
)
def test_send_many_matches_sends_on_fractional_traces(trace: Trace) -> None:
    """With non-integral capacities the two sum in different orders: equal to rounding."""
    times, sizes = _workload(6)
    many = Link(trace, 0.01, jitter_s=0.005, loss=0.05, seed=8).send_many(times, sizes)
    one = Link(trace, 0.01, jitter_s=0.005, loss=0.05, seed=8)
    each = [one.send(float(t), int(s)) for t, s in zip(times, sizes, strict=True)]
    np.testing.assert_allclose(many, each, rtol=0, atol=1e-9)


def test_send_many_in_chunks_equals_one_call(tmp_path: Path) -> None:
    trace = _mahimahi(tmp_path, seed=1)
    times, sizes = _workload(5)
    whole = Link(trace, 0.02, jitter_s=0.01, loss=0.1, seed=9).send_many(times, sizes)
    link = Link(trace, 0.02, jitter_s=0.01, loss=0.1, seed=9)
    parts = [link.send_many(times[a:b], sizes[a:b]) for a, b in ((0, 7), (7, 150), (150, 300))]
    np.testing.assert_array_equal(whole, np.concatenate(parts))


def test_determinism_and_seeds(tmp_path: Path) -> None:
    trace = _mahimahi(tmp_path)
    times, sizes = _workload(7)

    def run(seed: int, **kw: float) -> np.ndarray:
        return Link(trace, 0.02, seed=seed, **kw).send_many(times, sizes)

    np.testing.assert_array_equal(run(1, loss=0.1, jitter_s=0.01), run(1, loss=0.1, jitter_s=0.01))
    assert not np.array_equal(run(1, loss=0.1, jitter_s=0.01), run(2, loss=0.1, jitter_s=0.01))
    assert not np.array_equal(run(1, loss=0.1), run(2, loss=0.1))
    assert not np.array_equal(run(1, jitter_s=0.01), run(2, jitter_s=0.01))
    # without randomness the seed does not matter
    np.testing.assert_array_equal(run(1), run(2))


# ---------------------------------------------------------------------------------------- loss


def test_loss_resends_packets_at_the_expected_rate() -> None:
    """10-packet transfers at loss 0.1: the resends are negative binomial, mean 10 * 0.1 / 0.9;
    each costs one packet's serialisation (no retransmission wait with zero delay)."""
    n = 3000
    times = np.arange(n, dtype=np.float64)  # 1 s apart: no queueing
    link = Link(constant(8.0), 0.0, loss=0.1, seed=7)
    took = link.send_many(times, np.full(n, 15_000)) - times
    extra = (took - 0.015) / (PACKET_BYTES / 1e6)
    np.testing.assert_allclose(extra, np.round(extra), atol=1e-6)  # whole packets
    assert extra.min() >= -1e-9
    assert extra.mean() == pytest.approx(10 * 0.1 / 0.9, abs=0.12)
    assert extra.var() == pytest.approx(10 * 0.1 / 0.9**2, rel=0.25)


def test_each_loss_costs_a_retransmission_wait() -> None:
    """The default wait is a round trip, 2 * delay; an explicit one replaces it."""
    times = np.arange(500, dtype=np.float64)
    sizes = np.full(500, PACKET_BYTES)
    for retransmit, wait in ((None, 0.1), (0.03, 0.03)):
        link = Link(constant(8.0), 0.05, loss=0.3, retransmit_s=retransmit, seed=2)
        took = link.send_many(times, sizes) - times
        lost = (took - 0.0015 - 0.05) / (0.0015 + wait)
        np.testing.assert_allclose(lost, np.round(lost), atol=1e-6)
        assert lost.mean() == pytest.approx(0.3 / 0.7, abs=0.1)
        assert lost.max() >= 2


def test_loss_slows_a_busy_link(tmp_path: Path) -> None:
    trace = _mahimahi(tmp_path)
    times, sizes = _workload(3)
    clean = Link(trace, 0.01).send_many(times, sizes)
    lossy = Link(trace, 0.01, loss=0.2, seed=4).send_many(times, sizes)
    assert np.all(lossy >= clean - 1e-12)
    assert lossy[-1] > clean[-1]


# --------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("delay", "jitter", "loss"),
    [
        (-0.01, 0.0, 0.0),
        (math.nan, 0.0, 0.0),
        (0.0, -0.1, 0.0),
        (0.0, 0.0, 1.0),
        (0.0, 0.0, -0.1),
        (0.0, 0.0, 1.5),
    ],
)
def test_invalid_link_arguments(delay: float, jitter: float, loss: float) -> None:
    with pytest.raises(ValueError, match="loss in"):
        Link(constant(8.0), delay, jitter_s=jitter, loss=loss)
    Link(constant(8.0), 0.0, jitter_s=0.0, loss=0.999)  # the edges of the valid range


def test_invalid_sends() -> None:
    link = Link(constant(8.0), 0.01)
    with pytest.raises(ValueError, match="must not decrease"):
        link.send_many(np.array([0.0, 2.0, 1.0]), np.array([10, 10, 10]))
    with pytest.raises(ValueError, match="sizes must be >= 0"):
        link.send_many(np.array([0.0, 1.0]), np.array([10, -1]))
    with pytest.raises(ValueError):
        link.send(0.0, -5)
    # the rejected calls left the link idle
    assert link.send(0.0, 1_000_000) == pytest.approx(1.01)


# ------------------------------------------------------------------------ vectorised lookups


def _linear_traces() -> list[Trace]:
    traces = [steps([1.0, 5.0, 0.5, 3.0], 0.7), random_walk(3.0, 1.0, 0.5, 30.0, seed=2)]
    traces.append(on_off(8.0, 1.0, 0.5))
    norway = TRACES / "norway-3g" / "norway_bus_1"
    if norway.is_file():
        traces.append(read_trace(norway))
    return traces


def test_vectorised_lookups_match_scalar_on_steps(tmp_path: Path) -> None:
    traces = [_mahimahi(tmp_path, seed=3)]
    att = TRACES / "mahimahi" / "ATT-LTE-driving-2016.up"
    if att.is_file():
        traces.append(read_trace(att))
    rng = np.random.default_rng(11)
    for trace in traces:
        times = np.concatenate([rng.uniform(0, 5 * trace.period_s, 2000), trace.times_s])
        expected = [trace.capacity(float(t)) for t in times]
        np.testing.assert_array_equal(trace.capacity_many(times), expected)
        sizes = np.concatenate(
            [
                rng.integers(1, int(5 * trace.period_bytes), 2000),
                trace.cum_bytes[1:],
                np.arange(1, 6) * trace.period_bytes,
            ]
        )
        expected = [trace.time_for(float(n)) for n in sizes]
        np.testing.assert_array_equal(trace.time_for_many(sizes), expected)


def test_vectorised_lookups_match_scalar_on_linear() -> None:
    rng = np.random.default_rng(12)
    for trace in _linear_traces():
        times = np.concatenate([rng.uniform(0, 5 * trace.period_s, 2000), trace.times_s])
        expected = [trace.capacity(float(t)) for t in times]
        np.testing.assert_allclose(trace.capacity_many(times), expected, rtol=1e-12)
        sizes = rng.uniform(1, 5 * trace.period_bytes, 2000)
        expected = [trace.time_for(float(n)) for n in sizes]
        np.testing.assert_allclose(trace.time_for_many(sizes), expected, rtol=1e-12)


def test_time_for_many_at_whole_periods_of_a_fractional_trace() -> None:
    """14 periods' bytes of a trace whose period_bytes is not an integer: the scalar answers,
    the vector version indexes past the trace (and so does a Link sending that much)."""
    trace = random_walk(3.0, 1.0, 0.5, 30.0, seed=2)
    nbytes = 14 * trace.period_bytes
    assert trace.time_for_many(np.array([nbytes]))[0] == trace.time_for(nbytes)
    arrival = Link(trace).send_many(np.array([0.0]), np.array([nbytes]))[0]
    assert arrival == pytest.approx(14 * trace.period_s)
