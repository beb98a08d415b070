"""Progress for long work: a bar on a terminal, a heartbeat off one.

On a terminal, :func:`bar` is an ordinary tqdm bar on stderr (hidden when ``show`` is false,
as in ``--json`` mode). Off a terminal (a log file, a pipe, a service manager) a bar's
carriage returns would make noise, and showing nothing would make a long run look hung, so
the same tqdm object writes plain lines instead, at most one every :data:`HEARTBEAT_S`
seconds, the first that long after the process started (a short command prints none):
``teacher 3/60: 120/450 [00:30<01:02, loss=0.1234]``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

DEFAULT_HEARTBEAT_S = 30.0


def _heartbeat_s() -> float:
    try:
        return max(0.0, float(os.environ.get("TANDEM_HEARTBEAT_S", DEFAULT_HEARTBEAT_S)))
    except ValueError:
        return DEFAULT_HEARTBEAT_S


HEARTBEAT_S = _heartbeat_s()
"""The shortest time between two heartbeat lines of a long command off a terminal (also its
first line's delay): 30 s, or the environment's ``TANDEM_HEARTBEAT_S``."""

LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


class _Lines:
    """A text stream for tqdm that turns its carriage-return redraws into whole lines, drops
    the blank ones it writes to clear itself, and lets through at most one line every
    ``every_s`` seconds across every bar of the process (a new bar per epoch must not make
    the heartbeat any faster)."""

    # Shared by all bars: one heartbeat for the whole process, whose first line comes one
    # interval after start, so a short command prints none.
    last_line_at = time.monotonic()

    def __init__(self, out: IO[str], every_s: float) -> None:
        self.out = out
        self.every_s = every_s

    def write(self, text: str) -> int:
        for line in text.replace("\r", "\n").split("\n"):
            now = time.monotonic()
            if line.strip() and now - _Lines.last_line_at >= self.every_s:
                _Lines.last_line_at = now
                self.out.write(line.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    show: bool = True,
    out: IO[str] | None = None,
    every_s: float = HEARTBEAT_S,
) -> tqdm[Any]:
    """A tqdm bar over ``iterable`` (or driven by ``update``) writing to ``out`` (stderr).

    On a terminal it is a bar, hidden unless ``show``; elsewhere it is a heartbeat whatever
    ``show`` says: a line at the start, then at most one every ``every_s`` seconds.
    """
    stream = out if out is not None else sys.stderr
    options: dict[str, Any] = {"total": total, "desc": desc, "leave": False}
    if stream.isatty():
        return tqdm(iterable, file=stream, disable=not show, **options)
    return tqdm(
        iterable,
        file=_Lines(stream, every_s),
        mininterval=every_s,
        bar_format=LINE_FORMAT,
        ascii=True,
        dynamic_ncols=False,
        **options,
    )


def beat(line: str, out: IO[str] | None = None, every_s: float = HEARTBEAT_S) -> None:
    """Off a terminal, write ``line`` to ``out`` (stderr) as a heartbeat, unless another
    heartbeat line went out less than ``every_s`` seconds ago; on a terminal, nothing."""
    stream = out if out is not None else sys.stderr
    if not stream.isatty():
        _Lines(stream, every_s).write(line)
