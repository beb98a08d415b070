"""Split policy: pick the bottleneck width and codec for each request to meet a latency SLO.

A bundle's manifest measures a table of operating points: for each width, and each codec
there (the quantise+zstd codec at a bit depth, or a rate point of the learned entropy
model), the accuracy and the mean encoded bytes per sample. The policy predicts the
end-to-end latency of every point on the current link and takes the most accurate point
whose prediction fits the SLO.

Latency model, in milliseconds, for an option ``o`` on a link ``l``::

    predicted = head_ms[o.width]                           # device: head + bottleneck encoder
              + l.rtt_ms                                   # one round trip (propagation, setup)
              + o.bytes_per_sample * 8 / l.uplink_bps * 1000   # serialising the request
              + response_bytes * 8 / l.downlink_bps * 1000     # serialising the response
              + server_ms                                  # cloud: queue, decode, tail

Everything is additive and deterministic, so the same inputs always give the same decision. The
model deliberately ignores variance: the link estimator (``tandem.link``) already filters its RTT
towards the floor and the SLO is a target, not a tail bound. A link with zero bandwidth makes
any non-empty transfer infinitely slow, which is how an outage in a trace reads.

This module imports only the standard library: the network simulator imports it so that its
simulated decisions are exactly the daemon's, without pulling in torch, numpy or grpc.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Decision", "LinkState", "Option", "SplitPolicy"]


def _number(name: str, value: object) -> float:
    """``value`` as a float, or a ValueError naming ``name``; bools are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    result = float(value)
    if math.isnan(result):
        raise ValueError(f"{name} must not be NaN")
    return result


def _finite_nonnegative(name: str, value: object) -> float:
    """``value`` as a finite float >= 0, or a ValueError naming ``name``."""
    result = _number(name, value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {result}")
    if result < 0:
        raise ValueError(f"{name} must be >= 0, got {result}")
    return result


def _rate(name: str, value: object) -> float:
    """A bandwidth in bits/s: >= 0, and infinity allowed (an unconstrained direction)."""
    result = _number(name, value)
    if result < 0:
        raise ValueError(f"{name} must be >= 0, got {result}")
    return result


def _transfer_ms(nbytes: float, bps: float) -> float:
    """Milliseconds to serialise ``nbytes`` at ``bps``; nothing to send costs nothing."""
    if nbytes == 0:
        return 0.0
    if bps == 0:
        return math.inf
    return nbytes * 8.0 / bps * 1000.0


@dataclass(frozen=True)
class LinkState:
    """What the device knows about its link to the cloud.

    ``rtt_ms`` is the round-trip time of an empty request, ``uplink_bps`` and ``downlink_bps``
    the bandwidths in bits per second. A bandwidth may be ``math.inf`` (not a constraint) or 0
    (nothing gets through).
    """

    rtt_ms: float
    uplink_bps: float
    downlink_bps: float = math.inf

    def __post_init__(self) -> None:
        """Reject values the latency model cannot use."""
        _finite_nonnegative("rtt_ms", self.rtt_ms)
        _rate("uplink_bps", self.uplink_bps)
        _rate("downlink_bps", self.downlink_bps)


@dataclass(frozen=True)
class Option:
    """One measured operating point: a bottleneck width and codec, its accuracy and its size.

    ``width`` is the fraction of bottleneck channels sent, in (0, 1]; the codec is either the
    quantise+zstd codec at ``bits``, or rate ``point`` of the entropy model (exactly one of
    the two is set); ``accuracy`` is in [0, 1]; ``bytes_per_sample`` is the mean encoded
    request payload.
    """

    width: float
    bits: int | None
    accuracy: float
    bytes_per_sample: float
    point: int | None = None

    def __post_init__(self) -> None:
        """Reject points that cannot come from a real measurement."""
        width = _number("width", self.width)
        if not 0 < width <= 1:
            raise ValueError(f"width must be in (0, 1], got {width}")
        if (self.bits is None) == (self.point is None):
            raise ValueError(
                f"an option names bits or a rate point, exactly one: got bits {self.bits!r}, "
                f"point {self.point!r}"
            )
        if self.bits is not None and not _whole(self.bits, 1):
            raise ValueError(f"bits must be a positive integer, got {self.bits!r}")
        if self.point is not None and not _whole(self.point, 0):
            raise ValueError(f"point must be a non-negative integer, got {self.point!r}")
        accuracy = _finite_nonnegative("accuracy", self.accuracy)
        if accuracy > 1:
            raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
        _finite_nonnegative("bytes_per_sample", self.bytes_per_sample)


@dataclass(frozen=True)
class Decision:
    """What to do with one request.

    ``local`` is True when the whole model should run on the device; then ``width``, ``bits``
    and ``point`` are None. Otherwise ``width`` and one of ``bits`` (quantise+zstd) and
    ``point`` (a rate point) name the option to encode with. ``predicted_ms`` is the model's
    latency for that choice, ``meets_slo`` whether it fits the SLO, and ``reason`` a short
    human-readable explanation for logs and reports.
    """

    width: float | None
    bits: int | None
    local: bool
    predicted_ms: float
    meets_slo: bool
    reason: str
    point: int | None = None


_DEFAULT_PRIOR = LinkState(rtt_ms=50.0, uplink_bps=1e6, downlink_bps=1e6)


class SplitPolicy:
    """Chooses, per request, the (width, bits) with the best accuracy that meets the SLO.

    ``options`` are the measured operating points (see ``from_table`` for a manifest's table),
    ``slo_ms`` the latency target, ``head_ms`` a mapping from width to the device's head compute
    time in ms, ``server_ms`` the expected server time, ``response_bytes`` the size of a reply,
    ``local_ms`` the time to run the whole model on the device (None when the device has no
    fallback model), and ``prior`` the link assumed before the estimator has any data.
    """

    def __init__(
        self,
        options: Iterable[Option],
        slo_ms: float,
        head_ms: Mapping[float, float],
        *,
        server_ms: float = 0.0,
        response_bytes: float = 64,
        local_ms: float | None = None,
        prior: LinkState = _DEFAULT_PRIOR,
    ) -> None:
        """Validate and store the inputs; raises ValueError on anything unusable."""
        opts = tuple(options)
        if not opts:
            raise ValueError("options must not be empty: the policy needs at least one point")
        seen: set[tuple[float, int, int]] = set()
        for o in opts:
            if not isinstance(o, Option):
                raise ValueError(f"options must be Option instances, got {o!r}")
            # Two rows for one (width, codec) would make the choice depend on their order.
            key = (float(o.width), *_codec_key(o))
            if key in seen:
                raise ValueError(f"duplicate option for width {o.width} and {_codec_name(o)}")
            seen.add(key)

        slo = _number("slo_ms", slo_ms)
        if not math.isfinite(slo) or slo <= 0:
            raise ValueError(f"slo_ms must be finite and > 0, got {slo}")

        head: dict[float, float] = {}
        for w, ms in head_ms.items():
            try:
                width = float(w)
            except (TypeError, ValueError):
                raise ValueError(f"head_ms key {w!r} is not a width") from None
            head[width] = _finite_nonnegative(f"head_ms[{w!r}]", ms)
        missing = sorted({float(o.width) for o in opts} - head.keys())
        if missing:
            raise ValueError(f"head_ms has no time for width(s) {missing}")

        if not isinstance(prior, LinkState):
            raise ValueError(f"prior must be a LinkState, got {prior!r}")

        self._options = opts
        self._slo_ms = slo
        self._head_ms = head
        self._server_ms = _finite_nonnegative("server_ms", server_ms)
        self._response_bytes = _finite_nonnegative("response_bytes", response_bytes)
        self._local_ms = None if local_ms is None else _finite_nonnegative("local_ms", local_ms)
        self._prior = prior

    @classmethod
    def from_table(
        cls,
        table: Iterable[Mapping[str, object]],
        slo_ms: float,
        head_ms: Mapping[float, float],
        *,
        server_ms: float = 0.0,
        response_bytes: float = 64,
        local_ms: float | None = None,
        prior: LinkState = _DEFAULT_PRIOR,
    ) -> SplitPolicy:
        """Build a policy from a manifest's table: dicts with width, accuracy, bytes_per_sample
        and either bits (quantise+zstd) or point (a rate point; ``codec`` "entropy"), as parsed
        from JSON. Other arguments are as for the constructor."""
        options = []
        for i, row in enumerate(table):
            if not isinstance(row, Mapping):
                raise ValueError(f"table row {i} is not a mapping: {row!r}")
            entropy = row.get("codec") == "entropy"
            codec_key = "point" if entropy else "bits"
            needed = ("width", codec_key, "accuracy", "bytes_per_sample")
            absent = [k for k in needed if k not in row]
            if absent:
                raise ValueError(f"table row {i} lacks {', '.join(absent)}")
            value = row[codec_key]
            # JSON writers may emit 4.0 for 4; anything fractional is a broken table.
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"table row {i}: {codec_key} must be an integer, got {value!r}")
            try:
                options.append(
                    Option(
                        width=_number("width", row["width"]),
                        bits=None if entropy else value,
                        accuracy=_number("accuracy", row["accuracy"]),
                        bytes_per_sample=_number("bytes_per_sample", row["bytes_per_sample"]),
                        point=value if entropy else None,
                    )
                )
            except ValueError as e:
                raise ValueError(f"table row {i}: {e}") from None
        return cls(
            options,
            slo_ms,
            head_ms,
            server_ms=server_ms,
            response_bytes=response_bytes,
            local_ms=local_ms,
            prior=prior,
        )

    @property
    def options(self) -> tuple[Option, ...]:
        """The operating points, in the order given."""
        return self._options

    @property
    def slo_ms(self) -> float:
        """The latency target in ms."""
        return self._slo_ms

    @property
    def server_ms(self) -> float:
        """The current estimate of server time per request, in ms."""
        return self._server_ms

    @property
    def local_ms(self) -> float | None:
        """Time to run the whole model on the device, or None without a fallback model."""
        return self._local_ms

    @property
    def prior(self) -> LinkState:
        """The link assumed before any measurement."""
        return self._prior

    def set_server_ms(self, ms: float) -> None:
        """Update the expected server time (the daemon feeds it the server-reported timings)."""
        self._server_ms = _finite_nonnegative("server_ms", ms)

    def predict_ms(self, option: Option, link: LinkState | None = None) -> float:
        """Predicted end-to-end latency of ``option`` on ``link`` (the prior when None), in ms.

        See the module docstring for the model. Raises ValueError for a width without a head
        time.
        """
        link = self._prior if link is None else link
        try:
            head = self._head_ms[float(option.width)]
        except KeyError:
            raise ValueError(f"head_ms has no time for width {option.width}") from None
        return (
            head
            + link.rtt_ms
            + _transfer_ms(option.bytes_per_sample, link.uplink_bps)
            + _transfer_ms(self._response_bytes, link.downlink_bps)
            + self._server_ms
        )

    def decide(self, link: LinkState | None, *, cloud_up: bool = True) -> Decision:
        """Choose what to do with the next request.

        ``link`` is the current estimate, or None before the first measurement (the prior is
        used). Rules, in order:

        - cloud down: run locally if there is a local model; otherwise name the option the rules
          below would pick, with ``local=False`` and ``meets_slo=False``, so the caller can
          queue the request and retry;
        - some options meet the SLO: the most accurate of them; ties go to fewer bytes, then to
          the lower prediction;
        - none does: the option with the lowest prediction, unless the local model is strictly
          faster, in which case run locally.

        Remaining ties go to the smaller width, then the quantise+zstd codec before rate
        points, fewer bits, lower point, so the result never depends on the order of the
        options.
        """
        link = self._prior if link is None else link
        slo = self._slo_ms
        scored = [(o, self.predict_ms(o, link)) for o in self._options]
        within = [(o, p) for o, p in scored if p <= slo]

        go_local = False
        if within:
            best, predicted = min(
                within, key=lambda s: (-s[0].accuracy, s[0].bytes_per_sample, s[1], *_order(s[0]))
            )
            reason = f"best accuracy within {slo:g} ms"
        else:
            best, predicted = min(
                scored, key=lambda s: (s[1], -s[0].accuracy, s[0].bytes_per_sample, *_order(s[0]))
            )
            reason = "no option meets the SLO: fastest"
            if self._local_ms is not None and self._local_ms < predicted:
                go_local = True
                reason = "no option meets the SLO: local is faster"

        if not cloud_up:
            if self._local_ms is not None:
                return self._local("cloud unreachable: local fallback")
            return Decision(
                width=best.width,
                bits=best.bits,
                local=False,
                predicted_ms=predicted,
                meets_slo=False,
                reason="cloud unreachable: no local model, queue and retry",
                point=best.point,
            )
        if go_local:
            return self._local(reason)
        return Decision(
            width=best.width,
            bits=best.bits,
            local=False,
            predicted_ms=predicted,
            meets_slo=within != [],
            reason=reason,
            point=best.point,
        )

    def _local(self, reason: str) -> Decision:
        """A decision to run the whole model on the device."""
        assert self._local_ms is not None
        return Decision(
            width=None,
            bits=None,
            local=True,
            predicted_ms=self._local_ms,
            meets_slo=self._local_ms <= self._slo_ms,
            reason=reason,
        )


def _whole(value: object, least: int) -> bool:
    """Whether ``value`` is an int (not a bool) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _codec_key(o: Option) -> tuple[int, int]:
    """(0, bits) for the quantise+zstd codec, (1, point) for a rate point."""
    return (0, o.bits) if o.bits is not None else (1, o.point if o.point is not None else 0)


def _codec_name(o: Option) -> str:
    """The option's codec in words."""
    return f"bits {o.bits}" if o.bits is not None else f"rate point {o.point}"


def _order(o: Option) -> tuple[float, int, int]:
    """The last tie-break: smaller width, then quantise+zstd before rate points, fewer bits,
    lower point."""
    return (float(o.width), *_codec_key(o))
