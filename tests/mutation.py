"""Byte-level mutations of real messages, shared by the codec fuzz tests."""

from __future__ import annotations

import random
from collections.abc import Callable

FirstByte = Callable[[random.Random], int]


def mutate(r: random.Random, msg: bytes, first_byte: FirstByte) -> bytes:
    """``msg`` after one to eight random edits: bit flips, inserted, deleted or swapped
    bytes, truncation, an interesting value, zero or junk padding, or a new first byte drawn
    by ``first_byte`` (each codec knows which first bytes are worth trying)."""
    b = bytearray(msg)
    for _ in range(r.choice((1, 1, 1, 2, 3, 8))):
        op = r.randrange(8)
        if op == 0 and b:  # flip bits of one byte
            i = r.randrange(len(b))
            b[i] ^= 1 << r.randrange(8) if r.random() < 0.7 else r.randrange(1, 256)
        elif op == 1:  # insert bytes
            i = r.randrange(len(b) + 1)
            b[i:i] = r.randbytes(r.randint(1, 4))
        elif op == 2 and b:  # delete a run
            i = r.randrange(len(b))
            del b[i : i + r.randint(1, 4)]
        elif op == 3 and b:  # truncate
            del b[r.randrange(len(b)) :]
        elif op == 4 and b:  # set an interesting value
            b[r.randrange(len(b))] = r.choice((0x00, 0x01, 0x7F, 0x80, 0xFF))
        elif op == 5:  # pad: zeros or junk
            b += bytes(r.randint(1, 8)) if r.random() < 0.5 else r.randbytes(r.randint(1, 8))
        elif op == 6 and b:  # another header byte
            b[0] = first_byte(r)
        elif op == 7 and len(b) > 2:  # swap two bytes
            i, j = r.randrange(len(b)), r.randrange(len(b))
            b[i], b[j] = b[j], b[i]
    return bytes(b)
