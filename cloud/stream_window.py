"""How much of one ``InferStream`` the service takes on: a window the client acknowledges.

The server cannot see what a peer's application has read: gRPC clients grow their HTTP/2
receive window by probing the link, so a client that never reads still has thousands of
answers delivered into its own memory, and each was computed here. So the client says what
it has read: every request carries ``answers_read``, the running count of this stream's
answers it has read. The invariants, checked as each request is read:

* ``taken - answers_read <= limit``: the stream has at most ``limit`` requests taken on whose
  answers its client has not read. A request past that is not taken on; the stream ends.
* ``answers_read <= sent``: a client cannot have read an answer that was not sent. A claim
  past that is a lie, and the stream ends.

So a stream that writes and never reads has at most ``limit`` answers computed for it. A
client that reports reads it did not make is indistinguishable from one that reads quickly;
what bounds it is what bounds every fast client (the queue, the stream and connection limits).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from tandem.cloud.errors import RequestError


@dataclass
class StreamWindow:
    """One stream's counts; ``limit`` is ``max_stream_inflight``.

    ``taken`` counts the requests taken on (answered or not), ``sent`` the answers handed to
    the transport, ``read`` the highest ``answers_read`` the client reported.
    """

    limit: int
    taken: int = 0
    sent: int = 0
    read: int = 0

    def take(self, answers_read: int) -> None:
        """Take on one request that reports ``answers_read``; raise a RequestError (the
        stream's final status) when the request breaks an invariant."""
        if answers_read > self.sent:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"answers_read {answers_read} exceeds the {self.sent} answers sent on this stream",
            )
        self.read = max(self.read, answers_read)
        if self.taken + 1 - self.read > self.limit:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than max_stream_inflight={self.limit} answers of this stream unread "
                f"(answers_read={self.read}, requests={self.taken + 1}): keep at most "
                f"{self.limit} requests unanswered and report answers_read in each request",
            )
        self.taken += 1
