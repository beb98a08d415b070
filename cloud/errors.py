"""The one exception a request fails with, and how its message is kept small."""

from __future__ import annotations

import grpc

MAX_DETAILS = 300


class RequestError(Exception):
    """A request fails with ``code``; the message goes back to the client.

    Messages may quote what the client sent, so they are clipped: status details travel as
    metadata, and an echoed 20 KB model name would overflow grpc's metadata limit and turn
    the intended code into RESOURCE_EXHAUSTED.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        if len(message) > MAX_DETAILS:
            message = message[: MAX_DETAILS - 30] + f"... ({len(message)} chars)"
        super().__init__(message)
        self.code, self.message = code, message
        self.model = ""  # the served model it concerned, once resolved (a metrics label)
