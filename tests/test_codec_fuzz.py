"""Fuzz tandem.codec.decode: any input either decodes to an array or raises CodecError."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import zstandard
from mutation import mutate

from tandem.codec import (
    INTERNAL_ERROR_PREFIX,
    MAX_ELEMENTS,
    CodecError,
    decode,
    encode,
    read_header,
)

N_RANDOM = 2_500
N_MUTATED = 6_000
N_HEADER_RANDOM_PAYLOAD = 2_500


def _seed_messages() -> list[bytes]:
    rng = np.random.default_rng(0)
    msgs: list[bytes] = []
    shapes = [(), (5,), (2, 3, 4), (2, 2, 3, 3), (4, 8, 8), (1, 1, 1, 1, 1, 7)]
    for shape in shapes:
        x = rng.normal(size=shape).astype(np.float32)
        relu = np.maximum(x, 0)
        for bits in (2, 4, 8, 16):
            msgs.append(encode(x, bits, compress=False))
            msgs.append(encode(relu, bits))
    msgs.append(encode(np.zeros((3, 16, 16), np.float16), 8))
    msgs.append(encode((1e6 + rng.normal(size=(2, 4, 4))).astype(np.float64), 4))
    return msgs


def _first_byte(r: random.Random) -> int:
    """The magic byte, or any other."""
    return 0xEC if r.random() < 0.5 else r.randrange(256)


def _check(data: bytes, outcome: Counter[str]) -> None:
    try:
        y = decode(data)
    except CodecError as exc:
        # The safety net in decode must never be what catches a malformed input.
        assert not str(exc).startswith(INTERNAL_ERROR_PREFIX), str(exc)
        outcome["error"] += 1
        try:
            read_header(data)
        except CodecError as hexc:
            assert not str(hexc).startswith(INTERNAL_ERROR_PREFIX), str(hexc)
            outcome["header_error"] += 1
        return
    # Anything else propagating fails the test.
    assert isinstance(y, np.ndarray)
    assert y.dtype in (np.float16, np.float32, np.float64)
    assert y.size <= MAX_ELEMENTS
    assert np.isfinite(y).all()
    h = read_header(data)
    assert y.shape == h.shape
    outcome["ok"] += 1


def test_fuzz_decode_never_raises_anything_else() -> None:
    r = random.Random(0)
    seeds = _seed_messages()
    outcome: Counter[str] = Counter()
    total = 0

    for _ in range(N_RANDOM):
        data = bytearray(r.randbytes(r.randint(0, 96)))
        if data and r.random() < 0.5:
            data[0] = 0xEC
            if len(data) > 1 and r.random() < 0.7:
                data[1] = 0x10 | r.randrange(4)
        _check(bytes(data), outcome)
        total += 1

    for _ in range(N_MUTATED):
        _check(mutate(r, r.choice(seeds), _first_byte), outcome)
        total += 1

    cctx = zstandard.ZstdCompressor(level=1)
    for _ in range(N_HEADER_RANDOM_PAYLOAD):
        msg = r.choice(seeds)
        h = read_header(msg)
        head = bytearray(msg[: h.header_size])
        mode = r.randrange(4)
        if mode == 0:  # right length, random bytes
            payload = r.randbytes(h.payload_size)
        elif mode == 1:  # random length
            payload = r.randbytes(r.randint(0, 2 * h.payload_size + 4))
        elif mode == 2:  # a real zstd frame of random content and size
            payload = cctx.compress(r.randbytes(r.randint(0, 2 * h.packed_size + 2)))
        else:  # random parameters, original payload
            start = h.header_size - (0 if h.bits == 16 else 2 * h.groups * 2)
            for i in range(start, h.header_size):
                head[i] = r.randrange(256)
            payload = msg[h.header_size :]
        _check(bytes(head) + payload, outcome)
        total += 1

    for msg in seeds:  # the unmodified seeds all decode
        _check(msg, outcome)
        total += 1

    assert total >= 10_000
    assert outcome["ok"] + outcome["error"] == total
    # The corpus exercises both outcomes, deep paths included.
    assert outcome["ok"] > 200, outcome
    assert outcome["error"] > 2_000, outcome
    # Every decode failure that read_header accepted came from payload checks.
    assert outcome["header_error"] < outcome["error"], outcome
