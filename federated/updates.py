"""Compressed adapter updates: ``tandem.codec`` on the way up, decoded on the server.

A client's train reply would carry its trained adapter in float32. The client mod
:func:`compress_updates` replaces it with the *update* (trained minus what the server sent),
each tensor quantised by ``tandem.codec`` (8 or 4 bits, or float16, plus zstd) into bytes.
The server knows what it sent each client, so :func:`decode_reply` restores the trained
adapter as ``sent + update``. Updates are small and centred on zero, which is what makes a
coarse quantiser good enough for them.

Before encoding, each tensor is laid out rank-major as ``(r, 1, rest)``: the codec keeps one
scale per plane of the last two axes, so every rank-1 component gets its own scale.

The way down takes the same codec path for the adapter to train: :func:`compress_down`
replaces that record of the server's messages with its codec bytes, at the run's
``update-bits`` and ``update-zstd``, and the client mod :func:`decode_down` restores it before
anything else reads the message. The server keeps what the client will decode as what it
sent, so ``sent + update`` is exactly what the client trained, rounding and all. Records the
clients do not train (FFA-LoRA's frozen A, FLoRA's base) travel as float32: the server
evaluates and publishes with exactly those, and no reply could correct a rounded copy.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable

from tandem import codec
from tandem.federated.lora import Arrays
from tandem.federated.rank import truncate_tensor

UPDATE_KEY = "update"  # the reply's ConfigRecord of encoded tensors, bytes by array key
DOWN_PREFIX = "codec:"  # a down message's record KEY travels encoded as "codec:KEY"
SHAPE_SUFFIX = "#shape"  # ...with each tensor's shape beside its bytes
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"


class UpdateError(ValueError):
    """An encoded update that does not decode, or does not fit what was sent."""


def number(record: MetricRecord | ConfigRecord, key: str) -> float:
    """``record[key]`` as a float; ValueError when it is absent or not a number."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key!r} is {value!r}, not a number")
    return float(value)


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Arrays as a Flower ArrayRecord, keys kept."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    """A Flower ArrayRecord as a dict of NumPy arrays."""
    return {k: record[k].numpy() for k in record}


def _rank_major(key: str, x: np.ndarray) -> np.ndarray:
    # lora_A is (r, ...); lora_B is (out, r, ...): put r first either way.
    if key.endswith(".lora_B"):
        x = x.reshape(x.shape[0], x.shape[1]).T
    return np.ascontiguousarray(x.reshape(x.shape[0], 1, -1))


def encode_update(key: str, delta: np.ndarray, bits: int, compress: bool = True) -> bytes:
    """One tensor's update as codec bytes (``bits`` 4, 8 or 16)."""
    return codec.encode(_rank_major(key, np.asarray(delta, np.float32)), bits, compress=compress)


def decode_update(key: str, data: bytes, like: np.ndarray) -> np.ndarray:
    """The update for a tensor shaped like ``like``, or like its first r rank components
    (a client that trains a lower rank sends that); UpdateError if it fits neither."""
    full = _rank_major(key, like).shape
    try:
        flat = codec.decode(data, max_elements=max(1, like.size))
    except codec.CodecError as e:
        raise UpdateError(f"{key}: {e}") from None
    if flat.ndim != 3 or flat.shape[1:] != full[1:] or not 1 <= flat.shape[0] <= full[0]:
        raise UpdateError(f"{key}: update of shape {flat.shape} does not fit {full}")
    rank = flat.shape[0]
    rows = flat.reshape(rank, -1).astype(np.float32)
    if key.endswith(".lora_B"):
        return np.ascontiguousarray(rows.T).reshape(like.shape[0], rank, *like.shape[2:])
    return rows.reshape(rank, *like.shape[1:])


def compress_updates(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: a train reply's arrays leave as codec-encoded updates.

    The bits and zstd come from the message's config (``update-bits``, ``update-zstd``);
    the reply's metrics gain ``bytes-up``, the encoded size.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    sent = from_record(msg.content.array_records[ARRAYS_KEY])
    config = msg.content.config_records[CONFIG_KEY]
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    trained = from_record(reply.content.array_records[ARRAYS_KEY])
    bits, compress = int(number(config, "update-bits")), bool(config.get("update-zstd", True))
    encoded: dict[str, ConfigRecordValues] = {
        k: encode_update(k, v - _start(k, v, sent), bits, compress) for k, v in trained.items()
    }
    metrics = reply.content.metric_records[METRICS_KEY]
    metrics["bytes-up"] = sum(len(b) for b in encoded.values() if isinstance(b, bytes))
    reply.content = RecordDict({UPDATE_KEY: ConfigRecord(encoded), METRICS_KEY: metrics})
    return reply


def encode_arrays(arrays: Mapping[str, np.ndarray], bits: int, compress: bool) -> ConfigRecord:
    """Adapter tensors as one ConfigRecord: each key's codec bytes (as :func:`encode_update`
    writes them) and, under ``KEY#shape``, its shape."""
    record: dict[str, ConfigRecordValues] = {}
    for key, value in arrays.items():
        record[key] = encode_update(key, value, bits, compress)
        record[key + SHAPE_SUFFIX] = [int(d) for d in value.shape]
    return ConfigRecord(record)


def decode_arrays(record: ConfigRecord) -> Arrays:
    """The tensors of an :func:`encode_arrays` record; UpdateError if one does not decode."""
    arrays: Arrays = {}
    for key in record:
        if key.endswith(SHAPE_SUFFIX):
            continue
        data, shape = record[key], record.get(key + SHAPE_SUFFIX)
        if not isinstance(data, bytes) or not isinstance(shape, list):
            raise UpdateError(f"{key}: expected codec bytes and a shape")
        arrays[key] = decode_update(key, data, np.empty([int(d) for d in shape], np.float32))
    return arrays


def compress_down(messages: list[Message], bits: int, compress: bool) -> dict[int, Arrays]:
    """Replace, in place, each message's adapter to train (its ``arrays`` record) with its
    codec encoding (see the module docstring); return, by destination node, that record as the
    client will decode it: what the server must take as sent. Other records are left as they
    are. A record shared by several messages is encoded once."""
    encoded: dict[int, tuple[ConfigRecord, Arrays]] = {}
    held: dict[int, Arrays] = {}
    for message in messages:
        content = RecordDict()
        for key, record in message.content.items():
            if key != ARRAYS_KEY or not isinstance(record, ArrayRecord):
                content[key] = record
                continue
            if id(record) not in encoded:
                down = encode_arrays(from_record(record), bits, compress)
                encoded[id(record)] = (down, decode_arrays(down))
            down, decoded = encoded[id(record)]
            content[DOWN_PREFIX + key] = down
            held[message.metadata.dst_node_id] = decoded
        message.content = content
    return held


def down_bytes(message: Message) -> int:
    """The tensor bytes a :func:`compress_down` message carries: the adapter's codec bytes and
    the float32 records sent as they are (FFA-LoRA's frozen A, FLoRA's base)."""
    encoded = sum(
        len(value)
        for key, record in message.content.config_records.items()
        if key.startswith(DOWN_PREFIX)
        for value in record.values()
        if isinstance(value, bytes)
    )
    plain = sum(
        array.numpy().nbytes
        for record in message.content.array_records.values()
        for array in record.values()
    )
    return encoded + plain


def decode_down(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod (outermost): the server's encoded records back as array records."""
    content = RecordDict()
    for key, record in msg.content.items():
        if key.startswith(DOWN_PREFIX) and isinstance(record, ConfigRecord):
            content[key.removeprefix(DOWN_PREFIX)] = to_record(decode_arrays(record))
        else:
            content[key] = record
    msg.content = content
    return call_next(msg, context)


def _start(key: str, trained: np.ndarray, sent: Mapping[str, np.ndarray]) -> np.ndarray:
    """What the client started ``key`` from: the sent tensor, cut to the rank it trained."""
    if key not in sent:
        raise UpdateError(f"the reply has {key!r}, which the server did not send")
    rank = trained.shape[0] if key.endswith(".lora_A") else trained.shape[1]
    return truncate_tensor(key, sent[key], rank)


def decode_reply(reply: Message, sent: Mapping[str, np.ndarray]) -> Message:
    """Server side: a compressed train reply with its arrays restored as ``sent + update``.

    Keys the client did not send back (FFA-LoRA's frozen A) are absent from the result.
    Raises UpdateError for a key that was not sent or an update that does not fit.
    """
    record = reply.content.config_records[UPDATE_KEY]
    arrays: Arrays = {}
    for key in record:
        if key not in sent:
            raise UpdateError(f"update for {key!r}, which was not sent")
        value = record[key]
        if not isinstance(value, bytes):
            raise UpdateError(f"{key}: update is {type(value).__name__}, not bytes")
        delta = decode_update(key, value, sent[key])
        arrays[key] = _start(key, delta, sent) + delta
    reply.content = RecordDict(
        {ARRAYS_KEY: to_record(arrays), METRICS_KEY: reply.content.metric_records[METRICS_KEY]}
    )
    return reply
