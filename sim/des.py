"""Discrete-event simulation of many edge devices sharing one cloud service.

Each device has a compute profile, an arrival process and its own uplink and downlink traces;
all of them send to one cloud service that batches like ``cloud/`` (per-key lanes, a batch
closes at ``max_batch`` or ``max_delay``, then waits for one of ``workers``). A strategy says
what a device does with each input:

* ``local``: the whole model on the device;
* ``offload``: the input itself goes up (raw or PNG bytes); the cloud runs the whole model;
* ``split``: head and encoder on the device, fixed width and bits, the tail in the cloud;
* ``adaptive``: width and bits (or local) chosen per input by the real ``tandem.policy``, fed by
  the real ``tandem.link`` estimator from the device's own completed requests.

The fixed strategies are simulated in closed form, a device at a time and then the cloud a batch
at a time, in vectorised passes: every queue here is first in, first out, and a FIFO queue's
finish times are a running maximum. The adaptive strategy's decisions depend on answers that
depend on the cloud's load, so it alternates a decision pass over each device with a cloud pass
until fewer than 0.1% of the decisions change (or reports that they did not settle).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from tandem.link import LinkEstimator
from tandem.policy import SplitPolicy
from tandem.sim.batching import CloudModel, run_batches
from tandem.sim.link import Link, transfer_s
from tandem.sim.traces import Trace

StrategyKind = Literal["local", "offload", "split", "adaptive"]
UPLINK, DOWNLINK = 1, 2  # seed streams of a device's links, apart from its arrivals
RESPONSE_BYTES = 80.0  # an InferResponse with one class, ids and timings, give or take
MAX_ROUNDS = 8  # decision/cloud passes before the adaptive strategy reports no convergence
SETTLED = 0.001  # the adaptive strategy has converged when fewer decisions than this change


@dataclass(frozen=True)
class DeviceProfile:
    """A device's compute and radio: per-input head times per width, the whole model's time,
    the power drawn while computing, sending and receiving, and ``send_overhead_ms``: what the
    edge software adds to each request it sends besides the head (durable spooling, gRPC,
    thread hand-offs), measured with the real daemon (``sim.validate``)."""

    name: str
    head_ms: dict[float, float]
    full_ms: float
    compute_w: float
    tx_w: float
    rx_w: float
    send_overhead_ms: float = 0.0


@dataclass(frozen=True)
class Device:
    """One device: its profile, its inputs' arrival process and its link.

    Inputs arrive periodically at ``fps`` or, with ``poisson``, as a Poisson process of that
    rate; ``times``, when given, are the arrival times instead (a recorded workload).
    """

    profile: DeviceProfile
    up: Trace
    down: Trace
    delay_ms: float = 20.0
    fps: float = 10.0
    poisson: bool = False
    seed: int = 0
    times: tuple[float, ...] = ()


@dataclass(frozen=True)
class Strategy:
    """What devices do with an input.

    ``up_bytes`` is the request size for ``offload`` and ``split``, ``width`` the split's
    bottleneck width and ``accuracy`` the fixed strategy's measured accuracy (for ``adaptive``,
    the local model's). ``adaptive`` takes the bundle's measured ``table`` (rows as
    :meth:`SplitPolicy.from_table` reads them: width, bits or a rate point, accuracy and
    bytes_per_sample) and the latency target ``slo_ms`` its policy aims for.
    """

    kind: StrategyKind
    up_bytes: float = 0.0
    width: float | None = None
    accuracy: float = 0.0
    table: tuple[Mapping[str, Any], ...] = ()
    slo_ms: float = 100.0


@dataclass
class Outcome:
    """Per-input results of one simulation, all arrays aligned."""

    device: np.ndarray
    arrival_s: np.ndarray
    latency_s: np.ndarray
    up_bytes: np.ndarray
    down_bytes: np.ndarray
    local: np.ndarray
    energy_j: np.ndarray
    accuracy: np.ndarray
    cloud_busy_s: float
    duration_s: float
    workers: int
    cloud_done_s: np.ndarray  # when each answer left the cloud; NaN for local inputs
    rounds: int = 1
    converged: bool = True


def arrivals(device: Device, duration_s: float) -> np.ndarray:
    """Input arrival times in [0, duration): periodic at ``fps`` (a random phase), Poisson, or
    the device's recorded ``times``."""
    if device.times:
        times = np.asarray(device.times, np.float64)
        return np.sort(times[times < duration_s])
    rng = np.random.default_rng(device.seed)
    gap = 1.0 / device.fps
    if not device.poisson:
        return np.arange(rng.uniform(0, gap), duration_s, gap)
    n = int(duration_s * device.fps * 1.2) + 16
    times = np.cumsum(rng.exponential(gap, n))
    while times[-1] < duration_s:  # rare: draw more
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(gap, n))])
    return times[times < duration_s]


def fifo_finish(ready: np.ndarray, service: np.ndarray) -> np.ndarray:
    """Finish times of jobs served in order by one server: a running maximum in closed form."""
    work = np.cumsum(service)
    return work + np.maximum.accumulate(ready - (work - service))


def simulate(
    devices: Sequence[Device],
    cloud: CloudModel,
    strategy: Strategy,
    duration_s: float,
    response_bytes: float = RESPONSE_BYTES,
) -> Outcome:
    """Run ``strategy`` on every device for ``duration_s`` seconds of simulated time."""
    if strategy.kind == "adaptive":
        return _adaptive(devices, cloud, strategy, duration_s, response_bytes)
    parts = [_fixed_device(i, d, strategy, duration_s) for i, d in enumerate(devices)]
    return _finish(devices, cloud, parts, strategy, duration_s, response_bytes)


# -------------------------------------------------------------------------- fixed strategies


@dataclass
class _Sent:
    """One device's inputs up to the moment their requests reach the cloud."""

    device: int
    arrival: np.ndarray
    compute_s: np.ndarray  # device compute per input
    ready: np.ndarray  # device finished computing (and, for local, answered)
    local: np.ndarray
    up_bytes: np.ndarray
    at_cloud: np.ndarray  # NaN for local inputs
    lane: np.ndarray  # batching key for the cloud: -1 whole model, else the width
    accuracy: np.ndarray


def _fixed_device(index: int, device: Device, strategy: Strategy, duration_s: float) -> _Sent:
    t = arrivals(device, duration_s)
    n = len(t)
    p = device.profile
    if strategy.kind == "local":
        compute = np.full(n, p.full_ms / 1000)
    elif strategy.kind == "offload":
        compute = np.zeros(n)
    else:
        assert strategy.width is not None
        compute = np.full(n, p.head_ms[strategy.width] / 1000)
    ready = fifo_finish(t, compute)
    local = np.full(n, strategy.kind == "local")
    up_bytes = np.where(local, 0.0, strategy.up_bytes)
    at_cloud = np.full(n, np.nan)
    if not local.all():
        up = Link(device.up, device.delay_ms / 1000, seed=(device.seed, UPLINK))
        at_cloud = up.send_many(ready + p.send_overhead_ms / 1000, up_bytes)
    lane = -1.0 if strategy.kind == "offload" else (strategy.width or 0.0)
    accuracy = np.full(n, strategy.accuracy)
    return _Sent(index, t, compute, ready, local, up_bytes, at_cloud, np.full(n, lane), accuracy)


def _finish(
    devices: Sequence[Device],
    cloud: CloudModel,
    parts: list[_Sent],
    strategy: Strategy,
    duration_s: float,
    response_bytes: float,
) -> Outcome:
    sizes = [len(p.arrival) for p in parts]
    fields = [k for k in _Sent.__dataclass_fields__ if k != "device"]
    cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in fields}
    remote = ~cat["local"]
    done = np.full(len(remote), np.nan)
    done[remote], busy = run_batches(
        cat["at_cloud"][remote], cat["lane"][remote], cloud, duration_s
    )
    end = cat["ready"].copy()  # local inputs are answered when the device finishes
    down_bytes = np.where(remote, response_bytes, 0.0)
    energy = np.zeros(len(remote))
    offset = 0
    for part, device, n in zip(parts, devices, sizes, strict=True):
        rows = slice(offset, offset + n)
        end[rows], energy[rows] = _down(device, part, done[rows], down_bytes[rows])
        offset += n
    return Outcome(
        device=np.repeat(np.arange(len(parts)), sizes),
        arrival_s=cat["arrival"],
        latency_s=end - cat["arrival"],
        up_bytes=cat["up_bytes"],
        down_bytes=down_bytes,
        local=cat["local"],
        energy_j=energy,
        accuracy=cat["accuracy"],
        cloud_busy_s=busy,
        duration_s=duration_s,
        workers=cloud.workers,
        cloud_done_s=done,
    )


def _down(
    device: Device, part: _Sent, done: np.ndarray, down_bytes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Answers back over the device's downlink (in the order they are ready), and energy."""
    p = device.profile
    end = part.ready.copy()
    energy = part.compute_s * p.compute_w
    remote = ~part.local
    if remote.any():
        idx = np.flatnonzero(remote)
        order = idx[np.argsort(done[idx], kind="stable")]
        down = Link(device.down, device.delay_ms / 1000, seed=(device.seed, DOWNLINK))
        end[order] = down.send_many(done[order], down_bytes[order])
        # Radio energy: airtime at the trace's mean rate, a standard first-order model.
        up_air = part.up_bytes * 8 / (device.up.mean_mbps * 1e6)
        down_air = down_bytes * 8 / (device.down.mean_mbps * 1e6)
        energy = energy + np.where(remote, up_air * p.tx_w + down_air * p.rx_w, 0.0)
    return end, energy


# ---------------------------------------------------------------------------- adaptive


def _adaptive(
    devices: Sequence[Device],
    cloud: CloudModel,
    strategy: Strategy,
    duration_s: float,
    response_bytes: float,
) -> Outcome:
    """Decisions and the cloud's load depend on each other: alternate until they agree."""
    cloud_s: list[_Back | None] = [None] * len(devices)
    previous: list[_Sent] | None = None
    for rounds in range(1, MAX_ROUNDS + 1):
        parts = [
            _adaptive_device(i, d, cloud, strategy, duration_s, response_bytes, cloud_s[i])
            for i, d in enumerate(devices)
        ]
        outcome = _finish(devices, cloud, parts, strategy, duration_s, response_bytes)
        if previous is not None and _changed(parts, previous) < SETTLED:
            outcome.rounds = rounds
            return outcome
        cloud_s = _cloud_times(parts, outcome)
        previous = parts
    outcome.rounds, outcome.converged = MAX_ROUNDS, False
    return outcome


def _changed(parts: list[_Sent], previous: list[_Sent]) -> float:
    """The fraction of inputs decided differently from the previous round."""
    changed = sum(
        int(np.sum((a.local != b.local) | ~np.isclose(a.lane, b.lane, equal_nan=True)))
        for a, b in zip(parts, previous, strict=True)
    )
    return changed / max(1, sum(len(a.local) for a in parts))


def _cloud_times(parts: list[_Sent], outcome: Outcome) -> list[_Back | None]:
    """Per device and input: seconds in the cloud (what the server reports: queue, decode,
    compute) and from reaching the cloud to the answer arriving back."""
    out: list[_Back | None] = []
    offset = 0
    for part in parts:
        rows = slice(offset, offset + len(part.arrival))
        end = outcome.arrival_s[rows] + outcome.latency_s[rows]
        out.append(_Back(outcome.cloud_done_s[rows] - part.at_cloud, end - part.at_cloud))
        offset += len(part.arrival)
    return out


@dataclass(frozen=True)
class _Back:
    """What the previous round found for one device's inputs (NaN where it ran locally)."""

    server_s: np.ndarray
    back_s: np.ndarray


class _Answers:
    """What an adaptive device has learnt so far: answers arrive, in time order, and feed the
    daemon's own link estimator and the policy's server time, as in ``edge.daemon``."""

    def __init__(self, policy: SplitPolicy, response_bytes: float) -> None:
        self.policy, self.response_bytes = policy, response_bytes
        self.estimator = LinkEstimator()
        self._due: list[tuple[float, float, float, float]] = []  # at, bytes up, net ms, server ms

    def expect(self, at: float, up_bytes: float, network_s: float, server_s: float) -> None:
        """An answer that will arrive at ``at``."""
        heapq.heappush(self._due, (at, up_bytes, network_s * 1000, server_s * 1000))

    def decide(self, now: float) -> tuple[float, int | None, int | None] | None:
        """The policy's (width, bits, point) for an input at ``now``, or None to run it
        locally."""
        while self._due and self._due[0][0] <= now:
            _, sent, net_ms, server_ms = heapq.heappop(self._due)
            self.estimator.observe(
                round(sent), round(self.response_bytes), net_ms + server_ms, server_ms
            )
            self.policy.set_server_ms(server_ms)
        decision = self.policy.decide(self.estimator.state())
        if decision.local or decision.width is None:
            return None
        return decision.width, decision.bits, decision.point


def _adaptive_device(
    index: int,
    device: Device,
    cloud: CloudModel,
    strategy: Strategy,
    duration_s: float,
    response_bytes: float,
    cloud_s: _Back | None,
) -> _Sent:
    """One device's inputs in order, each decided by the policy from what it has seen so far.

    ``cloud_s`` holds, per input, the previous round's cloud time and time back (None in the
    first round, which assumes an idle cloud: a batch of one after the batching delay)."""
    p = device.profile
    policy = SplitPolicy.from_table(
        strategy.table, strategy.slo_ms, p.head_ms, response_bytes=response_bytes,
        local_ms=p.full_ms,
    )  # fmt: skip
    answers = _Answers(policy, response_bytes)
    rows = {(o.width, o.bits, o.point): o for o in policy.options}
    local_accuracy = strategy.accuracy
    up = Link(device.up, device.delay_ms / 1000, seed=(device.seed, UPLINK))
    t = arrivals(device, duration_s)
    n = len(t)
    sent = _Sent(
        index, t, compute_s=np.zeros(n), ready=np.zeros(n), local=np.zeros(n, bool),
        up_bytes=np.zeros(n), at_cloud=np.full(n, np.nan), lane=np.full(n, np.nan),
        accuracy=np.zeros(n),
    )  # fmt: skip
    free = 0.0
    for i, now in enumerate(t.tolist()):
        point = answers.decide(now)
        if point is None:
            sent.local[i], sent.compute_s[i] = True, p.full_ms / 1000
            sent.accuracy[i] = local_accuracy
            sent.ready[i] = free = max(now, free) + sent.compute_s[i]
            continue
        width, row = point[0], rows[point]
        sent.compute_s[i], sent.lane[i] = p.head_ms[width] / 1000, width
        sent.up_bytes[i], sent.accuracy[i] = row.bytes_per_sample, row.accuracy
        sent.ready[i] = free = max(now, free) + sent.compute_s[i]
        sending = sent.ready[i] + p.send_overhead_ms / 1000
        sent.at_cloud[i] = up.send(sending, round(sent.up_bytes[i]))
        server, back = _server_and_back(device, cloud, width, response_bytes, cloud_s, i)
        network = sent.at_cloud[i] - sending + back - server
        answers.expect(sent.at_cloud[i] + back, sent.up_bytes[i], network, server)
    return sent


def _server_and_back(
    device: Device,
    cloud: CloudModel,
    width: float,
    response_bytes: float,
    previous: _Back | None,
    i: int,
) -> tuple[float, float]:
    """Input ``i``'s cloud time and time back: the previous round's, or an idle cloud's."""
    if previous is not None and not np.isnan(previous.server_s[i]):
        return float(previous.server_s[i]), float(previous.back_s[i])
    server = cloud.max_delay_ms / 1000 + cloud.tail[width].seconds(1)
    return server, server + transfer_s(
        device.down, 0.0, round(response_bytes), device.delay_ms / 1000
    )
