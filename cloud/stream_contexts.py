"""Contexts of one ``InferStream``: the fields a stream's requests share, sent once.

A streamed request of a small model is mostly envelope: model name, version, width, adapter
and a request id around a payload of a few dozen bytes. A request that names a model and a
``context`` number defines that context (a definition without features gets no answer);
later requests with an empty model and that number carry only their payload, and a ``seq``
that, with the definer's ``request_id`` as namespace, makes the idempotency key
``NAMESPACE#SEQ``. So a retried request on a new stream, after the same definition, is
recognised as the same request.

Bounded: at most :data:`MAX_CONTEXTS` per stream (redefining one replaces it), each name
it keeps at most :data:`MAX_NAME` characters, and a namespace leaves room for any seq within
the request id's length limit. A definition that breaks these rules is a protocol error
(:class:`DefinitionError`): the service ends the stream, since the requests that were to
use the context could only fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from tandem.cloud.errors import RequestError
from tandem.stream_ids import MAX_CONTEXTS, MAX_NAMESPACE, SHARED_FIELDS, join
from tandem.wire.v1 import split_inference_pb2 as pb

MAX_NAME = 256  # characters of a model, version or adapter name a context keeps


class DefinitionError(RequestError):
    """A context definition the stream cannot keep; it ends the stream."""


@dataclass
class StreamContexts:
    """The contexts one stream has defined, by number."""

    defined: dict[int, pb.InferRequest] = field(default_factory=dict)

    def resolve(self, request: pb.InferRequest) -> pb.InferRequest | None:
        """The full request to serve for ``request``, or None for a definition alone.

        Raises RequestError when the request fails alone (a context that was never
        defined), and DefinitionError for a definition it cannot keep (one too many, a
        namespace too long for its keys, a name too long).
        """
        if request.model:
            if request.context:
                self._define(request)
                if not request.payload and not request.HasField("features"):
                    return None
            return request
        if not request.context:
            return request  # no model and no context: the service refuses it as usual
        template = self.defined.get(request.context)
        if template is None:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"context {request.context} is not defined on this stream",
            )
        full = pb.InferRequest()
        full.CopyFrom(template)
        full.request_id = request.request_id or join(template.request_id, request.seq)
        if request.deadline_ms:
            full.deadline_ms = request.deadline_ms
        if request.HasField("features"):
            full.features.CopyFrom(request.features)
        full.payload = request.payload
        return full

    def _define(self, request: pb.InferRequest) -> None:
        if not 0 < len(request.request_id) <= MAX_NAMESPACE:
            raise DefinitionError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a context's request_id is its namespace: 1..{MAX_NAMESPACE} chars",
            )
        names = (request.model, request.version, request.adapter, request.adapter_version)
        if max(map(len, names)) > MAX_NAME:
            raise DefinitionError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a context keeps names of at most {MAX_NAME} chars",
            )
        if request.context not in self.defined and len(self.defined) >= MAX_CONTEXTS:
            raise DefinitionError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a stream may define at most {MAX_CONTEXTS} contexts",
            )
        template = pb.InferRequest(request_id=request.request_id)
        for name in SHARED_FIELDS:
            setattr(template, name, getattr(request, name))
        self.defined[request.context] = template
