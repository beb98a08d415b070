"""The stream window's two invariants, on its counts alone (the service tests drive it
over gRPC in tests/test_cloud_limits.py)."""

from __future__ import annotations

import grpc
import pytest

from tandem.cloud.errors import RequestError
from tandem.cloud.stream_window import StreamWindow


def test_a_client_that_never_reads_gets_exactly_the_window() -> None:
    window = StreamWindow(limit=3)
    for _ in range(3):
        window.take(0)
    with pytest.raises(RequestError) as refused:
        window.take(0)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert window.taken == 3  # the refused request was not taken on


def test_each_answer_read_frees_one_place() -> None:
    window = StreamWindow(limit=2)
    window.take(0)
    window.take(0)
    window.sent = 2
    window.take(1)  # one read: one more may be taken on
    with pytest.raises(RequestError):
        window.take(1)
    window.take(2)
    assert (window.taken, window.read) == (4, 2)


def test_a_lower_count_than_reported_before_does_not_shrink_what_was_read() -> None:
    window = StreamWindow(limit=1)
    window.take(0)
    window.sent = 1
    window.take(1)
    window.sent = 2
    window.take(2)
    with pytest.raises(RequestError) as refused:
        window.take(0)  # read stays 2; taken 3 - 2 = 1 unread, the window is full
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_reads_beyond_what_was_sent_are_refused() -> None:
    window = StreamWindow(limit=8)
    window.take(0)
    with pytest.raises(RequestError) as refused:
        window.take(1)  # nothing has been sent yet
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert window.taken == 1
