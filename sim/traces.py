"""Bandwidth traces: what one direction of a link can deliver, and when.

A :class:`Trace` is the cumulative number of bytes the link can have delivered by each moment
of one period; it repeats when the period ends, as Mahimahi's traces do. Two shapes share that
form:

* packet-delivery traces (Mahimahi): one 1,500-byte delivery opportunity per listed
  millisecond, so capacity grows in steps;
* rate traces (``time_s throughput_mbps`` lines, and every synthetic trace): a rate that holds
  from one sample to the next, so capacity grows linearly in between.

Everything the link model needs, "how much by time t" and "by when N bytes", is then one
binary search into two arrays, however long the trace.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

PACKET_BYTES = 1500  # one Mahimahi delivery opportunity
# k * period + 0.001 may come back from divmod a hair below 0.001: a step that the float
# missed by less than this still counts (Mahimahi's resolution is a millisecond).
STEP_SLACK_S = 1e-9
Shape = Literal["steps", "linear"]
Seed = int | tuple[int, ...]  # numpy seeds: a tuple keeps streams of different purposes apart


class TraceError(ValueError):
    """A trace file or spec that cannot be read as a trace."""


@dataclass(frozen=True)
class Trace:
    """Cumulative deliverable bytes over one period, repeating.

    ``times_s`` rise from 0 and ``cum_bytes`` never fall; ``cum_bytes[-1]`` is what one period
    delivers. With ``shape == "steps"`` capacity jumps to ``cum_bytes[i]`` at ``times_s[i]``;
    with ``"linear"`` it grows linearly between the points.
    """

    name: str
    times_s: np.ndarray
    cum_bytes: np.ndarray
    period_s: float
    shape: Shape

    def __post_init__(self) -> None:
        """Reject arrays that do not describe a capacity curve."""
        t, c = self.times_s, self.cum_bytes
        if t.ndim != 1 or t.shape != c.shape or len(t) < 2:
            raise TraceError(f"{self.name}: times and bytes must be 1-D, equal and >= 2 long")
        if not (np.all(np.diff(t) >= 0) and np.all(np.diff(c) >= 0)):
            raise TraceError(f"{self.name}: times and cumulative bytes must not decrease")
        if not (t[0] == 0 and c[0] == 0 and math.isclose(t[-1], self.period_s)):
            raise TraceError(f"{self.name}: a trace runs from 0 to its period")
        if not self.period_s > 0 or not c[-1] > 0:
            raise TraceError(f"{self.name}: a trace needs a positive period and some capacity")

    @property
    def period_bytes(self) -> float:
        """Bytes one period can deliver."""
        return float(self.cum_bytes[-1])

    @property
    def mean_mbps(self) -> float:
        """Mean capacity over the period, in Mbit/s."""
        return self.period_bytes * 8 / self.period_s / 1e6

    def capacity(self, t: float) -> float:
        """Bytes the link can have delivered from time 0 up to and including ``t``."""
        laps, offset = divmod(t, self.period_s)
        return laps * self.period_bytes + self._within(offset)

    def time_for(self, nbytes: float) -> float:
        """The earliest time by which ``capacity`` reaches ``nbytes`` (inverse of capacity)."""
        if nbytes <= 0:
            return 0.0
        laps, rest = divmod(nbytes, self.period_bytes)
        if rest == 0:  # exactly whole periods: the end of the last one, not the next start
            laps, rest = laps - 1, self.period_bytes
        return laps * self.period_s + self._time_within(rest)

    # The scalar methods above and their array twins below compute the same curve: the link
    # model needs both, one request at a time (adaptive devices) and whole runs at once, and
    # wrapping the scalar case in arrays would cost it several times over.

    def capacity_many(self, times: np.ndarray) -> np.ndarray:
        """:meth:`capacity` at each of ``times``, in one vectorised pass."""
        laps, offset = np.divmod(np.asarray(times, np.float64), self.period_s)
        t, c = self.times_s, self.cum_bytes
        slack = STEP_SLACK_S if self.shape == "steps" else 0.0
        i = np.searchsorted(t, offset + slack, side="right") - 1
        within = c[i]
        if self.shape == "linear":
            j = np.minimum(i + 1, len(t) - 1)
            span = t[j] - t[i]
            frac = np.divide(offset - t[i], span, out=np.zeros_like(span), where=span > 0)
            within = c[i] + (c[j] - c[i]) * frac
        return laps * self.period_bytes + within

    def time_for_many(self, nbytes: np.ndarray) -> np.ndarray:
        """:meth:`time_for` for each of ``nbytes`` (all > 0), in one vectorised pass."""
        laps, rest = np.divmod(np.asarray(nbytes, np.float64), self.period_bytes)
        whole = rest == 0  # exactly whole periods: the end of the last one, not the next start
        laps, rest = laps - whole, np.where(whole, self.period_bytes, rest)
        t, c = self.times_s, self.cum_bytes
        i = np.searchsorted(c, rest, side="left")
        within = t[i]
        if self.shape == "linear":
            grow = c[i] - c[i - 1]
            within = t[i - 1] + (t[i] - t[i - 1]) * (rest - c[i - 1]) / grow
        return laps * self.period_s + within

    def _within(self, offset: float) -> float:
        t, c = self.times_s, self.cum_bytes
        slack = STEP_SLACK_S if self.shape == "steps" else 0.0
        i = int(np.searchsorted(t, offset + slack, side="right")) - 1
        if self.shape == "steps" or i >= len(t) - 1:
            return float(c[i])
        span = t[i + 1] - t[i]
        return float(c[i] + (c[i + 1] - c[i]) * (offset - t[i]) / span) if span else float(c[i])

    def _time_within(self, nbytes: float) -> float:
        t, c = self.times_s, self.cum_bytes
        i = int(np.searchsorted(c, nbytes, side="left"))  # first point with c >= nbytes
        if self.shape == "steps":
            return float(t[i])
        grow = c[i] - c[i - 1]
        return float(t[i - 1] + (t[i] - t[i - 1]) * (nbytes - c[i - 1]) / grow)


@dataclass(frozen=True)
class TracePair:
    """The two directions of one link: device to network (up) and back (down)."""

    up: Trace
    down: Trace


# ------------------------------------------------------------------------------- reading files


def read_mahimahi(path: Path) -> Trace:
    """A Mahimahi packet-delivery trace: one millisecond timestamp per 1,500-byte opportunity.

    The trace repeats after its last timestamp, as in Mahimahi.
    """
    ms = _numbers(path, columns=1)[:, 0]
    if np.any(ms < 0) or np.any(np.diff(ms) < 0) or np.any(ms != np.round(ms)):
        raise TraceError(f"{path}: Mahimahi timestamps are non-decreasing whole milliseconds")
    period = float(ms[-1]) / 1000
    if period <= 0:
        raise TraceError(f"{path}: the last timestamp must be after 0 ms")
    # An opportunity at 0 ms falls where the previous lap ends: it counts at the period's end,
    # which keeps every lap identical and the capacity at time 0 zero.
    at = np.sort(np.where(ms == 0, ms[-1], ms)) / 1000
    times = np.concatenate([[0.0], at])
    cum = np.arange(len(times), dtype=np.float64) * PACKET_BYTES
    # Several opportunities in one millisecond: the capacity there is the last total.
    last = np.append(times[1:] != times[:-1], True)
    return Trace(path.name, times[last], cum[last], period, "steps")


def read_rate_trace(path: Path) -> Trace:
    """A ``time_s throughput_mbps`` trace; each rate holds until the next sample.

    The last sample holds for the median sampling interval, and then the trace repeats.
    """
    rows = _numbers(path, columns=2)
    times, mbps = rows[:, 0] - rows[0, 0], rows[:, 1]
    if np.any(np.diff(times) <= 0) or np.any(mbps < 0):
        raise TraceError(f"{path}: times must rise and rates must be >= 0")
    step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0
    return rate_trace(path.name, np.append(times, times[-1] + step), mbps)


def read_trace(path: Path) -> Trace:
    """A trace file in either format: one column is Mahimahi, two are rate samples."""
    try:
        first = next(line for line in path.read_text().splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read trace {path}: {exc}") from exc
    except StopIteration:
        raise TraceError(f"{path}: the trace is empty") from None
    return read_mahimahi(path) if len(first.split()) == 1 else read_rate_trace(path)


def read_pair(prefix: Path) -> TracePair:
    """``PREFIX.up`` and ``PREFIX.down``, the Mahimahi naming of a link's two directions."""
    return TracePair(
        read_trace(prefix.with_name(prefix.name + ".up")),
        read_trace(prefix.with_name(prefix.name + ".down")),
    )


def _numbers(path: Path, columns: int) -> np.ndarray:
    try:
        lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read trace {path}: {exc}") from exc
    if not lines:
        raise TraceError(f"{path}: the trace is empty")
    bad = next((i for i, f in enumerate(lines) if len(f) != columns), None)
    if bad is not None:
        raise TraceError(f"{path}: line {bad + 1} has {len(lines[bad])} fields, not {columns}")
    try:
        values = np.asarray(lines, dtype=np.float64)
    except ValueError as exc:
        raise TraceError(f"{path}: {exc}") from exc
    if not np.all(np.isfinite(values)):
        raise TraceError(f"{path}: values must be finite")
    return values


# ---------------------------------------------------------------------------- making traces


def rate_trace(name: str, edges_s: np.ndarray, mbps: np.ndarray) -> Trace:
    """A trace whose rate is ``mbps[i]`` from ``edges_s[i]`` to ``edges_s[i + 1]``."""
    edges, rates = np.asarray(edges_s, np.float64), np.asarray(mbps, np.float64)
    if len(edges) != len(rates) + 1 or edges[0] != 0:
        raise TraceError(f"{name}: need one more edge than rates, starting at 0")
    cum = np.concatenate([[0.0], np.cumsum(rates * 1e6 / 8 * np.diff(edges))])
    return Trace(name, edges, cum, float(edges[-1]), "linear")


def constant(mbps: float, period_s: float = 1.0) -> Trace:
    """A link that always carries ``mbps``."""
    return rate_trace(f"constant-{mbps:g}", np.array([0.0, period_s]), np.array([mbps]))


def steps(mbps: list[float], hold_s: float) -> Trace:
    """Rates in turn, each for ``hold_s`` seconds, then around again."""
    edges = np.arange(len(mbps) + 1) * hold_s
    return rate_trace("steps-" + "-".join(f"{r:g}" for r in mbps), edges, np.array(mbps))


def random_walk(
    mean_mbps: float,
    sigma_mbps: float,
    step_s: float,
    duration_s: float,
    seed: Seed,
    floor_mbps: float = 0.05,
) -> Trace:
    """A rate that moves by N(0, sigma) every ``step_s``, pulled back towards the mean and kept
    at or above ``floor_mbps``: the slow fading of a moving device, deterministic per seed."""
    if not (step_s > 0 and duration_s > 0 and sigma_mbps >= 0):
        raise ValueError("step and duration must be > 0 and sigma >= 0")
    rng = np.random.default_rng(seed)
    n = max(1, round(duration_s / step_s))
    rates = np.empty(n)
    rate = max(floor_mbps, mean_mbps)
    for i in range(n):
        rates[i] = rate
        rate = max(floor_mbps, rate + 0.2 * (mean_mbps - rate) + rng.normal(0, sigma_mbps))
    return rate_trace(f"walk-{mean_mbps:g}-s{seed}", np.arange(n + 1) * step_s, rates)


def on_off(mbps: float, on_s: float, off_s: float) -> Trace:
    """``mbps`` for ``on_s`` seconds, then an outage of ``off_s`` seconds, repeating."""
    edges = np.array([0.0, on_s, on_s + off_s])
    return rate_trace(f"onoff-{mbps:g}", edges, np.array([mbps, 0.0]))


def parse_spec(spec: str, seed: Seed = 0) -> Trace:
    """A trace from a spec: a file path, or ``const:MBPS``, ``steps:MBPS,MBPS,...@HOLD_S``,
    ``walk:MEAN,SIGMA@STEP_S`` (600 s, drawn with ``seed``) or ``onoff:MBPS@ON_S,OFF_S``."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in _SPECS:
        path = Path(spec)
        if not path.is_file():
            raise TraceError(f"no trace file {spec!r} (or a spec: {', '.join(_SPECS)})")
        return read_trace(path)
    try:
        return _SPECS[kind](rest, seed)
    except (ValueError, TypeError) as exc:
        raise TraceError(f"bad trace spec {spec!r}: {exc}") from exc


def varies_by_seed(spec: str) -> bool:
    """Whether ``parse_spec(spec, seed)`` gives a different trace for each seed."""
    return spec.partition(":")[0] == "walk"


def _floats(text: str) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError("values must be finite and >= 0")
    return values


def _at(text: str) -> tuple[list[float], list[float]]:
    left, sep, right = text.partition("@")
    if not sep:
        raise ValueError("expected VALUES@TIMES")
    return _floats(left), _floats(right)


def _const(text: str, seed: Seed) -> Trace:
    (mbps,) = _floats(text)
    return constant(mbps)


def _steps(text: str, seed: Seed) -> Trace:
    rates, (hold,) = _at(text)
    return steps(rates, hold)


def _walk(text: str, seed: Seed) -> Trace:
    (mean, sigma), (step,) = _at(text)
    return random_walk(mean, sigma, step, 600.0, seed=seed)


def _onoff(text: str, seed: Seed) -> Trace:
    (mbps,), (on, off) = _at(text)
    return on_off(mbps, on, off)


# Every maker takes the seed; only the random walk draws with it.
_SPECS: dict[str, Callable[[str, Seed], Trace]] = {
    "const": _const,
    "steps": _steps,
    "walk": _walk,
    "onoff": _onoff,
}
