"""Between codec bytes and the wire: the ``EncodedTensor`` message of proto/tandem/v1.

The message carries the codec header field by field. The edge splits encoded bytes into
fields with :func:`to_message`; the cloud puts them back together with :func:`from_message`
and then decodes with :func:`tandem.codec.decode`, so every check the codec makes on bytes
it also makes on what arrives over gRPC. :func:`bare_message` is a request as the daemon's
stream sends it, which the simulator also measures.
"""

from __future__ import annotations

import numpy as np

from tandem import codec
from tandem.wire.v1 import split_inference_pb2 as pb
from tandem.wire.v1 import tensor_pb2

# The proto enum's numbers are the codec's dtype codes.
_DTYPE_BY_ENUM = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype(np.float32),
    tensor_pb2.DTYPE_FLOAT16: np.dtype(np.float16),
    tensor_pb2.DTYPE_FLOAT64: np.dtype(np.float64),
}
_ENUM_BY_DTYPE = {v: k for k, v in _DTYPE_BY_ENUM.items()}


def to_message(data: bytes) -> tensor_pb2.EncodedTensor:
    """The ``EncodedTensor`` for bytes made by :func:`tandem.codec.encode`."""
    header, params, payload = codec.split(data)
    return tensor_pb2.EncodedTensor(
        codec_version=header.version,
        dtype=_ENUM_BY_DTYPE[header.dtype],
        bits=header.bits,
        shape=header.shape,
        zstd=header.compressed,
        fp32_params=header.param_precision == "float32",
        params=params,
        payload=payload,
    )


def from_message(msg: tensor_pb2.EncodedTensor) -> bytes:
    """Codec bytes for a received ``EncodedTensor``; decode them to validate the rest.

    Raises:
        tandem.codec.CodecError: for a codec version, dtype, bits or shape the codec's
            layout cannot express.
    """
    if msg.codec_version != codec.VERSION:
        raise codec.CodecError(f"unsupported codec version {msg.codec_version}")
    dtype = _DTYPE_BY_ENUM.get(msg.dtype)
    if dtype is None:
        raise codec.CodecError(f"unknown dtype enum {msg.dtype}")
    return codec.assemble(
        dtype=dtype,
        bits=msg.bits,
        shape=tuple(msg.shape),
        compressed=msg.zstd,
        fp32_params=msg.fp32_params,
        params=msg.params,
        payload=msg.payload,
    )


def header_of(msg: tensor_pb2.EncodedTensor, max_elements: int) -> codec.Header:
    """Validate a received tensor's header (cheap: nothing is decompressed).

    Raises:
        tandem.codec.CodecError: if the header is malformed or exceeds ``max_elements``.
    """
    return codec.read_header(from_message(msg), max_elements=max_elements)


def bare_message(
    request: pb.InferRequest, context: int, seq: int, answers_read: int
) -> pb.InferRequest:
    """``request`` as a stream sends it under a defined context: no names, no id."""
    message = pb.InferRequest(
        context=context, seq=seq, payload=request.payload, answers_read=answers_read
    )
    if request.HasField("features"):
        message.features.CopyFrom(request.features)
    return message
