"""Fuzz tandem.entropy_codec.decode: any input decodes to valid symbols or raises CodecError."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
from mutation import mutate

from tandem.codec import INTERNAL_ERROR_PREFIX, CodecError
from tandem.entropy_codec import (
    MAX_TABLE_LENGTH,
    PRECISION,
    EntropyTables,
    decode,
    encode,
    payload_cap,
    point_of,
    width_index_of,
)

N_RANDOM = 8_000
N_MUTATED = 20_000
N_CROSSED = 3_000

Target = tuple[EntropyTables, tuple[int, int, int]]


def _row(rng: np.random.Generator, n: int) -> np.ndarray:
    if n == 1:
        return np.array([1 << PRECISION])
    w = np.exp(-np.abs(np.arange(n) - rng.uniform(0, n - 1)) / rng.uniform(0.2, 4.0))
    f = np.floor(w / w.sum() * ((1 << PRECISION) - n)).astype(np.int64) + 1
    f[int(np.argmax(f))] += (1 << PRECISION) - int(f.sum())
    return f


def _tables(rng: np.random.Generator, lengths: list[int]) -> EntropyTables:
    width = max(lengths)
    freqs = np.zeros((len(lengths), width), np.uint32)
    for c, n in enumerate(lengths):
        freqs[c, :n] = _row(rng, n)
    offset = rng.integers(-100, 100, size=len(lengths)).astype(np.int32)
    return EntropyTables(freqs, offset, np.array(lengths, np.int32))


def _targets() -> list[Target]:
    rng = np.random.default_rng(0)
    laplace = _tables(rng, [16] * 8)  # the MNIST-like bottleneck
    mixed = _tables(rng, [1, 2, 300, 1, 57, MAX_TABLE_LENGTH])  # certain rows and wide ones
    binary = EntropyTables(  # extremely skewed
        np.array([[1, (1 << PRECISION) - 1], [(1 << PRECISION) - 1, 1]], np.uint32),
        np.array([0, -1], np.int32),
        np.array([2, 2], np.int32),
    )
    return [
        (laplace, (8, 7, 7)),
        (laplace, (3, 7, 7)),
        (laplace, (1, 2, 3)),
        (mixed, (6, 4, 4)),
        (mixed, (3, 1, 5)),
        (binary, (2, 8, 8)),
    ]


def _seed_messages(targets: list[Target]) -> list[tuple[bytes, int]]:
    """Real encodings of symbols drawn from each target's tables, and of uniform ones."""
    rng = np.random.default_rng(1)
    msgs: list[tuple[bytes, int]] = []
    for i, (t, shape) in enumerate(targets):
        k = shape[0]
        for j in range(12):
            cols = np.empty(shape, np.int64)
            for c in range(k):
                n = int(t.length[c])
                if j % 3:
                    p = t.freqs[c, :n] / (1 << PRECISION)
                    cols[c] = rng.choice(n, size=shape[1:], p=p)
                else:
                    cols[c] = rng.integers(0, n, size=shape[1:])
            msgs.append((encode(cols + t.offset[:k, None, None], t, j % 8, j % 5), i))
    return msgs


def _first_byte(r: random.Random) -> int:
    """Another point and width, or another header altogether."""
    return 0x80 | r.randrange(64) if r.random() < 0.7 else r.randrange(256)


def _check(data: bytes, target: Target, outcome: Counter[str]) -> None:
    t, shape = target
    try:
        y = decode(data, t, shape)
    except CodecError as exc:
        # The safety net in decode must never be what catches a malformed input.
        assert not str(exc).startswith(INTERNAL_ERROR_PREFIX), str(exc)
        outcome["error"] += 1
        return
    # Anything else propagating fails the test.
    assert isinstance(y, np.ndarray)
    assert y.shape == shape and y.dtype == np.int32
    k = shape[0]
    lo = t.offset[:k, None, None]
    assert (y >= lo).all() and (y < lo + t.length[:k, None, None]).all()
    # An accepted payload is exactly what the encoder writes for the returned symbols.
    assert encode(y, t, point_of(data), width_index_of(data)) == data
    outcome["ok"] += 1


def test_fuzz_decode_never_raises_anything_else() -> None:
    r = random.Random(0)
    targets = _targets()
    seeds = _seed_messages(targets)
    outcome: Counter[str] = Counter()
    total = 0

    for _ in range(N_RANDOM):  # random payloads behind a valid header, any point
        target = r.choice(targets)
        n = int(np.prod(target[1]))
        size = r.choice((r.randint(0, 8), r.randint(0, payload_cap(n) + 16)))
        _check(bytes((0x80 | r.randrange(64),)) + r.randbytes(size), target, outcome)
        total += 1

    for _ in range(N_MUTATED):  # damaged real payloads against their own tables and shape
        msg, i = r.choice(seeds)
        _check(mutate(r, msg, _first_byte), targets[i], outcome)
        total += 1

    for _ in range(N_CROSSED):  # real or damaged payloads against other tables or shapes
        msg, _ = r.choice(seeds)
        if r.random() < 0.5:
            msg = mutate(r, msg, _first_byte)
        _check(msg, r.choice(targets), outcome)
        total += 1

    for msg, i in seeds:  # the unmodified seeds all decode
        before = outcome["ok"]
        _check(msg, targets[i], outcome)
        assert outcome["ok"] == before + 1
        total += 1

    assert total >= 10_000
    assert outcome["ok"] + outcome["error"] == total
    # The corpus exercises both outcomes.
    assert outcome["ok"] > 1_000, outcome
    assert outcome["error"] > 3_000, outcome
