"""The comparison a split point has to win: at equal accuracy, the bytes each route sends.

Within ``within`` of the teacher's top-1 accuracy (1 percentage point unless asked
otherwise), the smallest point that sends the input through a standard codec and the
smallest bottleneck point, both as measured (never interpolated between points). Their
ratio, bottleneck bytes over input bytes, is the figure ``tandem eval`` reports: below 1
the split sends less for the same accuracy. A route with no point that close to the teacher
has none, and then there is no ratio.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

DEFAULT_WITHIN = 0.01
"""How close to the teacher's accuracy a point must be (a fraction: 0.01 is 1 pp)."""

# Accuracies are fractions of a test split: this keeps a point exactly ``within`` below the
# teacher inside, whatever the float arithmetic does to the subtraction.
_SLACK = 1e-9


class Measured(Protocol):
    """Anything measured at one operating point: its accuracy and mean bytes per sample."""

    @property
    def accuracy(self) -> float: ...

    @property
    def bytes_per_sample(self) -> float: ...


M = TypeVar("M", bound=Measured)


def cheapest_within(points: Iterable[M], reference: float, within: float) -> M | None:
    """The point sending the fewest bytes among those at most ``within`` below ``reference``
    in accuracy (the first of equals), or None when none is that close."""
    close = [p for p in points if p.accuracy >= reference - within - _SLACK]
    return min(close, key=lambda p: p.bytes_per_sample, default=None)


@dataclass(frozen=True)
class EqualAccuracy:
    """The cheapest input-codec point and the cheapest bottleneck point within ``within`` of
    ``teacher_accuracy``, each None where no point of its route is that close."""

    teacher_accuracy: float
    within: float
    input: Measured | None
    bottleneck: Measured | None

    @property
    def ratio(self) -> float | None:
        """Bottleneck bytes over input bytes at equal accuracy, when both routes get there."""
        if self.input is None or self.bottleneck is None:
            return None
        return self.bottleneck.bytes_per_sample / self.input.bytes_per_sample

    def to_dict(self) -> dict[str, Any]:
        """As ``tandem eval --json`` reports it (the points as their own records)."""
        return {
            "teacher_accuracy": self.teacher_accuracy,
            "within": self.within,
            "input": _record(self.input),
            "bottleneck": _record(self.bottleneck),
            "ratio": self.ratio,
        }


def _record(point: Measured | None) -> dict[str, Any] | None:
    return None if point is None else asdict(point)  # type: ignore[call-overload]


def at_equal_accuracy(
    teacher_accuracy: float,
    bottleneck: Iterable[Measured],
    inputs: Iterable[Measured],
    within: float = DEFAULT_WITHIN,
) -> EqualAccuracy:
    """Compare both routes within ``within`` (a fraction, >= 0) of ``teacher_accuracy``."""
    if within < 0:
        raise ValueError(f"within must be >= 0, got {within}")
    return EqualAccuracy(
        teacher_accuracy,
        within,
        cheapest_within(inputs, teacher_accuracy, within),
        cheapest_within(bottleneck, teacher_accuracy, within),
    )
