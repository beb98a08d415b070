"""The link model: when N bytes sent at time t arrive, over a trace.

One :class:`Link` is one direction. Transfers queue first in, first out: a transfer starts
serialising when the link has finished the ones before it, and consumes the trace's capacity
from there (capacity that passes while the link is idle is lost, as on a real link). Then:

* one-way propagation ``delay_s``;
* optional jitter: each transfer's delay grows by ``|N(0, jitter_s)|``, never reordering;
* optional loss: each 1,500-byte packet is lost with probability ``loss``, on every try; each
  loss resends the packet (consuming capacity again) and costs one retransmission wait, a
  round trip by default, as a fast retransmit does.

Random draws come from generators seeded by ``seed``, so a link is deterministic, and
:meth:`Link.send_many` makes exactly the draws that successive :meth:`Link.send` calls would.
"""

from __future__ import annotations

import numpy as np

from tandem.sim.traces import PACKET_BYTES, Trace


class Link:
    """One direction of a link over ``trace``, starting idle at time 0."""

    def __init__(
        self,
        trace: Trace,
        delay_s: float = 0.0,
        *,
        jitter_s: float = 0.0,
        loss: float = 0.0,
        retransmit_s: float | None = None,
        seed: int | tuple[int, ...] = 0,
    ) -> None:
        """Raises ValueError for a negative delay or jitter, or a loss outside [0, 1)."""
        if not (delay_s >= 0 and jitter_s >= 0 and 0 <= loss < 1):
            raise ValueError("delay and jitter must be >= 0 and loss in [0, 1)")
        self.trace, self.delay_s, self.jitter_s, self.loss = trace, delay_s, jitter_s, loss
        self.retransmit_s = 2 * delay_s if retransmit_s is None else retransmit_s
        loss_seed, jitter_seed = np.random.SeedSequence(seed).spawn(2)
        self._loss_rng = np.random.default_rng(loss_seed)
        self._jitter_rng = np.random.default_rng(jitter_seed)
        self._cursor = 0.0  # capacity consumed so far, in bytes of the trace's curve
        self._last_arrival = 0.0

    def send(self, t: float, nbytes: int) -> float:
        """Queue ``nbytes`` at time ``t`` (seconds); the time its last byte arrives.

        The scalar twin of :meth:`send_many`, kept free of array overhead because the
        simulator's adaptive devices send one request at a time.
        """
        if nbytes < 0:
            raise ValueError("sizes must be >= 0")
        lost = 0
        if self.loss:
            packets = -(-nbytes // PACKET_BYTES)
            lost = int(self._loss_rng.negative_binomial(max(packets, 1), 1 - self.loss))
            lost = lost if packets else 0
        on_wire = nbytes + lost * PACKET_BYTES
        self._cursor = max(self._cursor, self.trace.capacity(t)) + on_wire
        done = self.trace.time_for(self._cursor) if on_wire else t
        jitter = abs(float(self._jitter_rng.normal(0.0, self.jitter_s))) if self.jitter_s else 0.0
        arrival = done + self.delay_s + jitter + lost * self.retransmit_s
        self._last_arrival = max(self._last_arrival, arrival)
        return self._last_arrival

    def send_many(self, times: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """:meth:`send` for transfers at non-decreasing ``times``, in one vectorised pass."""
        times = np.asarray(times, np.float64)
        sizes = np.asarray(sizes, np.float64)
        if len(times) and (np.any(np.diff(times) < 0) or np.any(sizes < 0)):
            raise ValueError("times must not decrease and sizes must be >= 0")
        lost = self._lost_packets(sizes)
        on_wire = sizes + lost * PACKET_BYTES
        # The queue in closed form: cursor_i = max(cursor_{i-1}, capacity(t_i)) + bytes_i,
        # which unrolls to a running maximum.
        before = np.concatenate([[0.0], np.cumsum(on_wire)[:-1]])
        reach = np.maximum.accumulate(self.trace.capacity_many(times) - before)
        cursor = before + on_wire + np.maximum(reach, self._cursor)
        done = np.where(on_wire > 0, self.trace.time_for_many(cursor), times)
        arrival = done + self.delay_s + self._jitter(len(times)) + lost * self.retransmit_s
        arrival = np.maximum.accumulate(np.maximum(arrival, self._last_arrival))
        if len(times):
            self._cursor, self._last_arrival = float(cursor[-1]), float(arrival[-1])
        return arrival

    def _lost_packets(self, sizes: np.ndarray) -> np.ndarray:
        if self.loss == 0:
            return np.zeros_like(sizes)
        packets = np.ceil(sizes / PACKET_BYTES).astype(np.int64)
        # A resent packet may be lost again: the resends until every packet got through are
        # the failures before ``packets`` successes, a negative binomial count.
        resent = self._loss_rng.negative_binomial(np.maximum(packets, 1), 1 - self.loss)
        return np.where(packets > 0, resent, 0).astype(np.float64)

    def _jitter(self, n: int) -> np.ndarray:
        if self.jitter_s == 0:
            return np.zeros(n)
        return np.abs(self._jitter_rng.normal(0.0, self.jitter_s, n))


def transfer_s(trace: Trace, t: float, nbytes: int, delay_s: float = 0.0) -> float:
    """Seconds from sending ``nbytes`` at ``t`` on an idle link to their arrival."""
    if nbytes <= 0:
        return delay_s
    return trace.time_for(trace.capacity(t) + nbytes) - t + delay_s
