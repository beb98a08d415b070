"""The discrete-event simulator: closed-form queues, the batcher's rules, and the strategies."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.sim.batching import BatchCost, CloudModel, run_batches
from tandem.sim.des import (
    Device,
    DeviceProfile,
    Strategy,
    arrivals,
    fifo_finish,
    simulate,
)
from tandem.sim.link import transfer_s
from tandem.sim.traces import constant, on_off

PROFILE = DeviceProfile("test", {0.25: 2.0, 0.5: 3.0}, full_ms=8.0, compute_w=4, tx_w=2, rx_w=1)
CLOUD = CloudModel({0.25: BatchCost(1.0, 0.5), 0.5: BatchCost(1.0, 0.6)}, BatchCost(2.0, 1.0))
TABLE = (
    {"width": 0.25, "bits": 2, "accuracy": 0.95, "bytes_per_sample": 60.0},
    {"width": 0.25, "bits": 4, "accuracy": 0.97, "bytes_per_sample": 100.0},
    {"width": 0.5, "bits": 4, "accuracy": 0.99, "bytes_per_sample": 2000.0},
)


def _device(mbps: float = 8.0, fps: float = 10.0, seed: int = 0, **kw: object) -> Device:
    return Device(PROFILE, constant(mbps), constant(mbps), fps=fps, seed=seed, **kw)  # type: ignore[arg-type]


def test_fifo_finish_matches_a_step_by_step_queue() -> None:
    rng = np.random.default_rng(0)
    ready = np.sort(rng.uniform(0, 10, 500))
    service = rng.uniform(0, 0.05, 500)
    free, expected = 0.0, []
    for r, s in zip(ready, service, strict=True):
        free = max(free, r) + s
        expected.append(free)
    np.testing.assert_allclose(fifo_finish(ready, service), expected)


def test_arrivals_periodic_and_poisson() -> None:
    periodic = arrivals(_device(fps=20), 10.0)
    assert len(periodic) == 200
    np.testing.assert_allclose(np.diff(periodic), 0.05)
    poisson = arrivals(_device(fps=20, poisson=True), 100.0)
    assert 1800 < len(poisson) < 2200 and np.all(np.diff(poisson) > 0)
    assert poisson.max() < 100.0
    again = arrivals(_device(fps=20, poisson=True), 100.0)
    np.testing.assert_array_equal(poisson, again)


def test_a_batch_closes_at_max_batch_or_max_delay() -> None:
    cloud = CloudModel({0.25: BatchCost(10.0, 0.0)}, BatchCost(1, 0), max_batch=3, max_delay_ms=5)
    at = np.array([0.0, 0.001, 0.002, 0.003, 0.100])
    done, _ = run_batches(at, np.full(5, 0.25), cloud)
    # Three fill a batch at 2 ms; the fourth waits 5 ms for company, then for the worker
    # (free at 12 ms); the last, alone, closes after its 5 ms.
    np.testing.assert_allclose(done, [0.012, 0.012, 0.012, 0.022, 0.115])


def test_a_waiting_batch_takes_what_arrived_meanwhile() -> None:
    cloud = CloudModel({0.25: BatchCost(50.0, 0.0)}, BatchCost(1, 0), max_batch=8, max_delay_ms=1)
    at = np.array([0.0, 0.002, 0.010, 0.020, 0.030])
    done, busy = run_batches(at, np.full(5, 0.25), cloud)
    # The first batch ({0}) closes at 1 ms and runs to 51 ms; the second closed at 3 ms but
    # waits for the worker, and by then all four others have arrived.
    np.testing.assert_allclose(done, [0.051, 0.101, 0.101, 0.101, 0.101])
    assert busy == pytest.approx(0.1)


def test_lanes_share_the_workers_in_the_order_their_batches_close() -> None:
    cloud = CloudModel(
        {0.25: BatchCost(10.0, 0.0), 0.5: BatchCost(10.0, 0.0)}, BatchCost(1, 0), max_delay_ms=1
    )
    at = np.array([0.0, 0.0005])
    done, _ = run_batches(at, np.array([0.5, 0.25]), cloud)
    np.testing.assert_allclose(done, [0.011, 0.021])


def test_utilisation_counts_only_the_simulated_window() -> None:
    cloud = CloudModel({0.25: BatchCost(100.0, 0.0)}, BatchCost(1, 0), max_batch=1)
    at = np.zeros(3)
    _, busy = run_batches(at, np.full(3, 0.25), cloud, horizon_s=0.15)
    assert busy == pytest.approx(0.15)


def test_local_latency_is_the_device_compute() -> None:
    out = simulate([_device()], CLOUD, Strategy("local", accuracy=0.99), 5.0)
    np.testing.assert_allclose(out.latency_s, 0.008)
    assert out.local.all() and out.up_bytes.sum() == 0 and out.cloud_busy_s == 0
    np.testing.assert_allclose(out.energy_j, 0.008 * PROFILE.compute_w)


def test_split_latency_adds_head_link_cloud_and_link() -> None:
    device = _device(mbps=8.0, fps=2.0, delay_ms=10.0)
    strategy = Strategy("split", up_bytes=1000, width=0.25, accuracy=0.97)
    out = simulate([device], CLOUD, strategy, 10.0, response_bytes=500)
    # Inputs 0.5 s apart never queue: each is head, uplink, a batch of one after max_delay,
    # and the downlink.
    up = transfer_s(constant(8.0), 0.0, 1000, 0.01)
    down = transfer_s(constant(8.0), 0.0, 500, 0.01)
    expected = 0.002 + up + CLOUD.max_delay_ms / 1000 + CLOUD.tail[0.25].seconds(1) + down
    np.testing.assert_allclose(out.latency_s, expected, rtol=1e-9)
    assert out.up_bytes.mean() == 1000 and out.down_bytes.mean() == 500


def test_offload_sends_the_input_and_runs_the_whole_model_in_the_cloud() -> None:
    out = simulate([_device()], CLOUD, Strategy("offload", up_bytes=800, accuracy=0.99), 5.0)
    assert not out.local.any() and out.up_bytes.mean() == 800
    busy = out.cloud_busy_s / len(out.latency_s)
    assert busy == pytest.approx(CLOUD.full.seconds(1))


def test_a_slow_uplink_makes_split_queue() -> None:
    fast = simulate([_device(8.0, fps=50)], CLOUD, Strategy("split", 2000, 0.25), 5.0)
    slow = simulate([_device(0.5, fps=50)], CLOUD, Strategy("split", 2000, 0.25), 5.0)
    # 2 kB at 50 fps is 0.8 Mbit/s: more than 0.5 Mbit/s carries, so the queue grows.
    assert np.median(slow.latency_s) > 10 * np.median(fast.latency_s)
    assert slow.latency_s[-1] > slow.latency_s[0]


def test_simulation_is_deterministic() -> None:
    devices = [_device(seed=s, poisson=True) for s in range(5)]
    a = simulate(devices, CLOUD, Strategy("split", 100, 0.25), 20.0)
    b = simulate(devices, CLOUD, Strategy("split", 100, 0.25), 20.0)
    np.testing.assert_array_equal(a.latency_s, b.latency_s)


def test_adaptive_takes_the_most_accurate_point_on_a_good_link() -> None:
    strategy = Strategy("adaptive", table=TABLE, slo_ms=200.0)
    out = simulate([_device(mbps=50.0, delay_ms=5.0)], CLOUD, strategy, 20.0)
    assert out.converged
    assert np.mean(out.accuracy == 0.99) > 0.9
    assert not out.local.any()


def test_adaptive_sends_fewer_bytes_on_a_slow_link() -> None:
    strategy = Strategy("adaptive", table=TABLE, slo_ms=200.0)
    good = simulate([_device(mbps=50.0)], CLOUD, strategy, 30.0)
    poor = simulate([_device(mbps=0.1)], CLOUD, strategy, 30.0)
    assert poor.up_bytes[poor.up_bytes > 0].mean() < good.up_bytes.mean() / 5
    assert np.percentile(poor.latency_s, 50) < 0.2  # it meets the SLO by choosing small points


def test_adaptive_runs_locally_when_no_point_fits_and_local_is_faster() -> None:
    strategy = Strategy("adaptive", table=TABLE, slo_ms=20.0, accuracy=0.995)
    device = Device(PROFILE, on_off(0.01, 1.0, 1.0), constant(10.0), delay_ms=200.0, fps=10)
    out = simulate([device], CLOUD, strategy, 30.0)
    assert out.local.mean() > 0.5
    np.testing.assert_allclose(out.latency_s[out.local][-10:], 0.008)
    np.testing.assert_array_equal(out.accuracy[out.local], 0.995)


def test_a_busy_lane_does_not_starve_another() -> None:
    cloud = CloudModel(
        {0.25: BatchCost(10.0, 0.0), 0.5: BatchCost(10.0, 0.0)},
        BatchCost(1, 0),
        max_batch=16,
        max_delay_ms=2,
    )
    at = np.concatenate([np.zeros(48), [0.001]])
    lanes = np.concatenate([np.full(48, 0.25), [0.5]])
    done, _ = run_batches(at, lanes, cloud)
    # As in cloud.batcher: the busy lane's second batch queued for the worker at once, the
    # other lane's at 3 ms, the busy lane's third only when its second started (10 ms).
    assert done[-1] == pytest.approx(0.030)
    assert sorted(set(np.round(done[:48], 6))) == [0.01, 0.02, 0.04]


def test_an_idle_cloud_guess_includes_the_batching_delay_and_the_way_back() -> None:
    from tandem.sim.des import _server_and_back

    device = _device(mbps=8.0, delay_ms=10.0)
    server, back = _server_and_back(device, CLOUD, 0.25, 500, None, 0)
    assert server == pytest.approx(CLOUD.max_delay_ms / 1000 + CLOUD.tail[0.25].seconds(1))
    assert back == pytest.approx(server + transfer_s(constant(8.0), 0.0, 500, 0.01))
