"""What a daemon run did, summed up from its sink records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
            "inputs": served + self.errors,
            "served": served,
            "served_locally": self.local,
            "errors": self.errors,
            "retries": self.retries,
            "accuracy": self.correct / self.labelled if has_labels and self.labelled else None,
            "bytes_per_sample": float(np.mean(self.bytes_sent)) if self.bytes_sent else None,
            "latency_ms": {
                f"p{q}": float(np.percentile(lat, q)) if served else None for q in (50, 95, 99)
            },
            "wall_s": wall_s,
            "inputs_per_s": served / wall_s if wall_s > 0 else None,
        }
