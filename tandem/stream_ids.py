"""Request ids on an ``InferStream``, one format for the edge that sends and the cloud that
resolves.

A streamed request that uses a context sends no request id: it sends a ``seq``, and the
service keys it ``NAMESPACE#SEQ``, where the namespace is the request id of the message that
defined the context (:mod:`tandem.cloud.stream_contexts`). An edge whose own request ids
have that form (the spool's do) can therefore send any of them as a bare ``seq`` and still
have the service recognise a resend, on this stream, on a later one or as a unary call.
"""

from __future__ import annotations

MAX_REQUEST_ID = 128
"""Characters of a request id the service accepts."""
MAX_NAMESPACE = MAX_REQUEST_ID - 21
"""Characters of a context's namespace: ``#`` and a uint64 in decimal still fit after it."""
MAX_CONTEXTS = 16
"""Contexts one stream may define at a time."""
SHARED_FIELDS = (
    "model", "version", "adapter", "adapter_version",
    "width", "top_k", "return_logits", "deadline_ms",
)  # fmt: skip
"""The ``InferRequest`` fields a context holds for the requests that use it."""
_MAX_SEQ = (1 << 64) - 1


def join(namespace: str, seq: int) -> str:
    """The request id the service gives the request ``seq`` of a context named ``namespace``."""
    return f"{namespace}#{seq}"


def split(request_id: str) -> tuple[str, int] | None:
    """``(namespace, seq)`` when ``request_id`` is exactly ``join(namespace, seq)`` for a
    namespace a context may have; None when the id cannot be sent as a bare seq."""
    namespace, sep, digits = request_id.rpartition("#")
    if not sep or not 0 < len(namespace) <= MAX_NAMESPACE:
        return None
    if not digits.isascii() or not digits.isdigit() or str(int(digits)) != digits:
        return None  # leading zeros, signs or other digits would name another id
    seq = int(digits)
    return (namespace, seq) if seq <= _MAX_SEQ else None
