"""One least-recently-used cache step over an ``OrderedDict``, shared by the bundle's tail
templates and the cloud workers' loaded models and adapters."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

__all__ = ["lru_get"]

K = TypeVar("K")
V = TypeVar("V")


def lru_get(cache: OrderedDict[K, V], key: K, load: Callable[[], V], size: int) -> V:
    """``cache[key]``, calling ``load()`` for it on a miss; marks it most recently used and
    evicts the least recently used entries beyond ``size``. Not thread-safe: a caller that
    shares ``cache`` between threads holds its own lock around the call."""
    if key not in cache:
        cache[key] = load()
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)
    return cache[key]
