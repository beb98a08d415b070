"""What a daemon run did, summed up from its sink records, and what it tells the user while
it runs: a report per cloud outage, not one per input or per retry."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tandem.progress import HEARTBEAT_S

REPORT_EVERY_S = HEARTBEAT_S
"""How often a condition that lasts (the cloud not answering) is reported again, and how often
a run off a terminal prints its heartbeat."""


@dataclass
class RunStats:
    """Counters and per-input latencies and sizes, fed one sink record at a time."""

    latencies_ms: list[float] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)
    correct: int = 0
    labelled: int = 0
    local: int = 0
    errors: int = 0
    retries: int = 0

    @property
    def processed(self) -> int:
        """Inputs with a line in the sink: served or failed."""
        return len(self.latencies_ms) + self.errors

    def add(self, record: dict[str, Any]) -> None:
        """Account for one record as written to the sink."""
        if "error" in record:
            self.errors += 1
            return
        self.latencies_ms.append(record["latency_ms"])
        if record["served_by"] == "local":
            self.local += 1
        else:
            self.bytes_sent.append(record["bytes_sent"])
        if "label" in record:
            self.labelled += 1
            self.correct += int(record["prediction"] == record["label"])

    def count_retry(self) -> None:
        """One more retried attempt."""
        self.retries += 1

    def summary(self, wall_s: float, *, has_labels: bool) -> dict[str, Any]:
        """The run's report: counts, accuracy, bytes per sample and latency percentiles."""
        served = len(self.latencies_ms)
        lat = np.asarray(self.latencies_ms) if served else np.zeros(1)
        return {
            "inputs": self.processed,
            "served": served,
            "served_locally": self.local,
            "errors": self.errors,
            "retries": self.retries,
            "labelled": self.labelled if has_labels else 0,
            "accuracy": self.correct / self.labelled if has_labels and self.labelled else None,
            "bytes_per_sample": float(np.mean(self.bytes_sent)) if self.bytes_sent else None,
            "latency_ms": {
                f"p{q}": float(np.percentile(lat, q)) if served else None for q in (50, 95, 99)
            },
            "wall_s": wall_s,
            "inputs_per_s": served / wall_s if wall_s > 0 else None,
        }


@dataclass
class Outage:
    """Reports about the cloud not answering: one at the first failure, one every ``every_s``
    while it lasts, one when the cloud answers again. Each method returns the line to log, or
    None when there is nothing new to say."""

    target: str
    every_s: float = REPORT_EVERY_S
    clock: Callable[[], float] = time.monotonic
    since: float | None = None
    _reported: float = 0.0
    _failures: int = 0

    def failed(self, why: str) -> str | None:
        """One more failed attempt, for reason ``why``."""
        now = self.clock()
        if self.since is None:
            self.since, self._reported, self._failures = now, now, 1
            return f"cloud {self.target} is not answering ({why})"
        self._failures += 1
        if now - self._reported < self.every_s:
            return None
        self._reported = now
        return (
            f"cloud {self.target} still not answering after {now - self.since:.0f} s, "
            f"{self._failures} failed attempts ({why})"
        )

    def answered(self) -> str | None:
        """The cloud answered: the end of an outage, if there was one."""
        if self.since is None:
            return None
        down, self.since = self.clock() - self.since, None
        return f"cloud {self.target} answering again after {down:.1f} s"
