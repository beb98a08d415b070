"""Link estimation from the daemon's own requests: round-trip time and bandwidth.

The daemon has no probe traffic: every completed request is a measurement. For a request of
``b`` bytes (up plus down) whose network time is ``t`` ms, the model is ::

    t = rtt + b * cost + queueing        cost = 8000 / bandwidth_bps (ms per byte), queueing >= 0

``LinkEstimator`` fits ``rtt`` and ``cost`` over a sliding window of recent requests and reports
them as a ``LinkState`` for ``tandem.policy``. Standard library only, like ``tandem.policy``.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from tandem.policy import LinkState

__all__ = ["LinkEstimator"]

# A regression needs a few points before its slope means anything.
_MIN_FIT_SAMPLES = 8
# Payload sizes must vary by at least this coefficient of variation. Compression alone makes one
# option's size wobble by a few percent; fitting a slope to that reads noise as bandwidth.
_MIN_SPREAD = 0.2
# The slope must stand this many standard errors above zero; otherwise the payload sizes did not
# vary enough, relative to the queueing noise, to separate transfer time from round-trip time.
_MIN_T = 3.0
# Refits on the samples nearest the lower envelope (see LinkEstimator).
_TRIM_ROUNDS = 2


def _valid(value: object) -> float | None:
    """``value`` as a finite float >= 0, or None: bad samples are dropped, never raised on."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    result = float(value)
    return result if math.isfinite(result) and result >= 0 else None


def _slope(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares slope of ys on xs and its standard error, or None if xs do not vary."""
    n = len(xs)
    if n < 3:
        return None
    mx = math.fsum(xs) / n
    my = math.fsum(ys) / n
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return None
    sxy = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    b = sxy / sxx
    ssr = math.fsum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    return b, math.sqrt(ssr / (n - 2) / sxx)


class LinkEstimator:
    """Estimates RTT and bandwidth from completed requests.

    Each ``observe`` adds one sample (bytes up + down, network time = elapsed - server time) to
    a window of the last ``window`` samples and updates the estimate from that window:

    1. **Cost per byte.** When the window holds at least 8 samples whose sizes vary enough
       (coefficient of variation >= 0.2), network time is fitted against bytes by least
       squares. Queueing only ever adds delay, so the fit is refined twice on the samples whose
       residual is at or below the median: those lie near the lower envelope, where the line
       is rtt + bytes * cost, and carry far less noise and none of the occasional spikes
       (retransmissions, pauses). The slope is used if it is positive and more than 3 standard
       errors above zero. Otherwise the previous estimate is held (at first the one implied by
       ``default_bps``): with payloads that barely vary, round trip and transfer cannot be told
       apart, and dividing bytes by leftover time would read queueing noise as bandwidth.
    2. **A hard bound.** No sample can have moved its bytes faster than its whole network time
       allows, so the cost is capped at min(time / bytes) over the window. This corrects a
       stale or default estimate the moment the data contradicts it.
    3. **Smoothing.** The cost is smoothed with an EWMA (weight ``alpha`` on the new value),
       on ms per byte rather than bits/s so one huge bandwidth guess cannot dominate.
    4. **RTT.** The minimum over the window of time - bytes * cost, clamped at 0: a min filter,
       like BBR's min_rtt, so queueing does not inflate it; because old samples leave the
       window, it rises when the path really gets slower. It is smoothed with the same EWMA.

    The bandwidth is fitted on bytes in both directions, so the reported ``LinkState`` gives
    the same value for uplink and downlink: with that, ``tandem.policy``'s latency model
    reproduces this one. Estimates depend only on the sequence of observations, not on when or
    how often ``state`` is called.
    """

    def __init__(self, window: int = 64, *, alpha: float = 0.2, default_bps: float = 1e6) -> None:
        """``window`` samples are kept (>= 3); ``alpha`` in (0, 1] weighs each new estimate;
        ``default_bps`` is the bandwidth assumed until the payload sizes reveal it."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 3:
            raise ValueError(f"window must be an integer >= 3, got {window!r}")
        if not (isinstance(alpha, int | float) and 0 < alpha <= 1):
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        if not (
            isinstance(default_bps, int | float) and math.isfinite(default_bps) and default_bps > 0
        ):
            raise ValueError(f"default_bps must be finite and > 0, got {default_bps!r}")
        self._window: deque[tuple[float, float]] = deque(maxlen=window)
        self._min_fit = min(_MIN_FIT_SAMPLES, window)
        self._alpha = float(alpha)
        self._default_cost = 8000.0 / float(default_bps)
        self._count = 0
        self._cost: float | None = None
        self._rtt: float | None = None

    @property
    def samples(self) -> int:
        """How many valid samples have been observed in total (not just those in the window)."""
        return self._count

    def reset(self) -> None:
        """Forget everything, e.g. after the device moved to another network."""
        self._window.clear()
        self._count = 0
        self._cost = None
        self._rtt = None

    def observe(
        self, bytes_up: int, bytes_down: int, elapsed_ms: float, server_ms: float = 0.0
    ) -> None:
        """Record one completed request.

        ``elapsed_ms`` is the client-side request time, ``server_ms`` the time the server
        reports spending on it; the difference (clamped at 0) is the network time. Samples with
        a negative, NaN, infinite or non-numeric value are ignored.
        """
        up, down = _valid(bytes_up), _valid(bytes_down)
        elapsed, server = _valid(elapsed_ms), _valid(server_ms)
        if up is None or down is None or elapsed is None or server is None:
            return
        self._window.append((up + down, max(0.0, elapsed - server)))
        self._count += 1
        self._update()

    def state(self) -> LinkState | None:
        """The current estimate, or None before the first valid observation."""
        if self._cost is None or self._rtt is None:
            return None
        bps = math.inf if self._cost == 0 else 8000.0 / self._cost
        return LinkState(rtt_ms=self._rtt, uplink_bps=bps, downlink_bps=bps)

    def _update(self) -> None:
        """Fold the current window into the smoothed estimates (steps 1 to 4 above)."""
        xs = [b for b, _ in self._window]
        ys = [t for _, t in self._window]
        previous = self._default_cost if self._cost is None else self._cost

        fitted = self._fit(xs, ys)
        raw = previous if fitted is None else fitted
        bound = min((t / b for b, t in zip(xs, ys, strict=True) if b > 0 and t > 0), default=None)
        if bound is not None:
            raw = min(raw, bound)
        cost = raw if self._cost is None else self._alpha * raw + (1 - self._alpha) * self._cost
        # The EWMA can lag behind a path that just got faster; the bound is a fact, not a guess.
        if bound is not None:
            cost = min(cost, bound)
        self._cost = cost

        rtt = max(0.0, min(t - b * cost for b, t in zip(xs, ys, strict=True)))
        self._rtt = rtt if self._rtt is None else self._alpha * rtt + (1 - self._alpha) * self._rtt

    def _fit(self, xs: list[float], ys: list[float]) -> float | None:
        """The cost per byte from the window, or None when the window cannot tell it."""
        if len(xs) < self._min_fit:
            return None
        mean = math.fsum(xs) / len(xs)
        # Float arithmetic, not statistics.pstdev: its exact fractions cost more than the
        # whole fit, and the simulator runs this once per simulated request.
        spread = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / len(xs))
        if mean <= 0 or spread < _MIN_SPREAD * mean:
            return None
        fit = _slope(xs, ys)
        if fit is None:
            return None
        for _ in range(_TRIM_ROUNDS):
            residuals = [y - fit[0] * x for x, y in zip(xs, ys, strict=True)]
            cut = statistics.median(residuals)
            keep = [i for i, r in enumerate(residuals) if r <= cut]
            refit = _slope([xs[i] for i in keep], [ys[i] for i in keep])
            if refit is None:
                break
            fit = refit
        slope, stderr = fit
        if slope <= 0 or slope < _MIN_T * stderr:
            return None
        return slope
