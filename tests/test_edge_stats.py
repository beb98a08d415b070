"""What the edge daemon tells the user while it runs: one report per outage, not per input."""

from __future__ import annotations

from tandem.edge.stats import Outage


def test_an_outage_is_reported_at_its_start_periodically_and_at_its_end() -> None:
    now = [0.0]
    outage = Outage("cloud:1", every_s=30.0, clock=lambda: now[0])
    assert outage.answered() is None  # no outage, nothing to end
    first = outage.failed("UNAVAILABLE: refused")
    assert first == "cloud cloud:1 is not answering (UNAVAILABLE: refused)"
    for t in (1.0, 10.0, 29.9):
        now[0] = t
        assert outage.failed("UNAVAILABLE: refused") is None
    now[0] = 31.0
    again = outage.failed("UNAVAILABLE: refused")
    assert again is not None and "still not answering after 31 s, 5 failed attempts" in again
    now[0] = 40.0
    assert outage.failed("x") is None
    assert outage.answered() == "cloud cloud:1 answering again after 40.0 s"
    assert outage.answered() is None
    now[0] = 50.0
    assert outage.failed("DEADLINE_EXCEEDED: slow") is not None  # a new outage
