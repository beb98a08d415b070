"""Result sinks for the edge daemon: one JSON line per input.

The sink is the last step of the spool protocol (``edge.spool``): a result is written here, and
only then is its spool entry completed. A crash between the two leaves an entry whose line is
already in the sink; on restart :attr:`JsonlSink.written_ids` holds the ``request_id`` of every
line in the file, so the daemon completes such an entry instead of writing it again.

Each line goes to the OS in a single ``write`` system call with no user-space buffer, so a
``kill -9`` loses nothing that :meth:`JsonlSink.write` returned from, and can at worst cut the
line being written short. Such a partial last line is removed when the file is opened again: its
entry is still pending in the spool, so the line is written again, whole. ``fsync`` (against
power loss, not process death) runs every ``fsync_every`` lines, on :meth:`JsonlSink.sync` and on
close; a daemon that must survive a power cut calls :meth:`~JsonlSink.sync` before completing
the spool entries of the lines it has written.

Sinks are not thread-safe: the daemon writes from one thread.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TextIO

from tandem.edge.closing import Closing

__all__ = ["STDOUT_SINKS", "JsonlSink", "Sink", "SinkError", "StdoutSink", "open_sink"]

log = logging.getLogger(__name__)

STDOUT_SINKS = frozenset({"-", "jsonl:-"})
"""The specs of the sink that writes to standard output."""


class SinkError(ValueError):
    """A sink spec could not be parsed, or its file cannot be opened for appending."""


class Sink(Protocol):
    """Where results go: one JSON object per input."""

    @property
    def written_ids(self) -> set[str]:
        """The ``request_id`` of every record already in the sink, including earlier runs'."""
        ...

    def write(self, record: dict[str, Any]) -> None:
        """Write one record as one line; when this returns, a process crash cannot lose it."""
        ...

    def sync(self) -> None:
        """Make every record written so far durable against power loss."""
        ...

    def close(self) -> None:
        """Sync and release the sink."""
        ...

    def __enter__(self) -> Self:
        """Use the sink as a context manager that closes it."""
        ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the sink."""
        ...


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":")) + "\n"


class JsonlSink(Closing):
    """An append-only JSON-lines file, repaired and reconciled when opened (see module docs).

    The file must be one that Tandem wrote (or empty, or absent): text after its last newline is
    taken to be a line cut short by a crash, and removed.
    """

    def __init__(self, path: Path | str, fsync_every: int = 256) -> None:
        if fsync_every < 1:
            raise ValueError(f"fsync_every must be at least 1, got {fsync_every}")
        self.path = Path(path)
        self.fsync_every = fsync_every
        self.written_ids: set[str] = set()
        self._unsynced = 0
        created = not self.path.exists()
        try:
            if not created:
                self._recover()
            # O_APPEND: every write lands at the end, after whatever the recovery left. Raw
            # (unbuffered) so that write() is the system call and nothing waits in user space.
            self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise SinkError(f"cannot open sink {self.path}: {exc.strerror or exc}") from exc
        if created:
            # A new file's directory entry is only durable once the directory is synced.
            _fsync_dir(self.path.parent)

    def _recover(self) -> None:
        """Drop a partial last line, then collect the request ids of the complete ones."""
        corrupt, first_corrupt = 0, 0
        with open(self.path, "r+b") as fh:
            offset = 0
            for n, line in enumerate(fh, start=1):
                if not line.endswith(b"\n"):
                    log.warning(
                        "%s: removing a partial last line (%d bytes), cut short by a crash",
                        self.path,
                        len(line),
                    )
                    fh.truncate(offset)
                    os.fsync(fh.fileno())
                    break
                offset += len(line)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):
                    corrupt += 1
                    first_corrupt = first_corrupt or n
                    continue
                request_id = record.get("request_id") if isinstance(record, dict) else None
                if isinstance(request_id, str):
                    self.written_ids.add(request_id)
        if corrupt:
            log.warning(
                "%s: ignored %d line(s) that are not valid JSON (the first is line %d)",
                self.path,
                corrupt,
                first_corrupt,
            )

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line in one system call; fsync every ``fsync_every``."""
        data = _line(record).encode("utf-8")
        view = memoryview(data)
        # A regular file takes the whole write unless the disk is full or a signal lands; loop
        # rather than assume. A kill between iterations leaves the partial line _recover drops.
        while view:
            written = self._fh.write(view)
            if written is None:  # only for non-blocking files; a regular file never is
                raise OSError(f"{self.path}: write would block")
            view = view[written:]
        request_id = record.get("request_id")
        if isinstance(request_id, str):
            self.written_ids.add(request_id)
        self._unsynced += 1
        if self._unsynced >= self.fsync_every:
            self.sync()

    def sync(self) -> None:
        """fsync the file, making every line written so far survive a power cut."""
        if self._unsynced:
            # Reset first: a line written while fsync runs (the daemon writes on one thread
            # and syncs on another) keeps its count and is synced next time.
            unsynced, self._unsynced = self._unsynced, 0
            try:
                os.fsync(self._fh.fileno())
            except OSError:
                self._unsynced += unsynced
                raise

    def close(self) -> None:
        """Sync and close the file; safe to call twice."""
        if not self._fh.closed:
            self.sync()
            self._fh.close()


class StdoutSink(Closing):
    """JSON lines on standard output (or another text stream), flushed after every line.

    ``written_ids`` is always empty: what went to stdout cannot be read back after a crash, so
    a restarted daemon may repeat the line of an entry that was written just before the kill
    but not yet completed in the spool. Use a file sink where exactly-once output matters.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = sys.stdout if stream is None else stream
        self.written_ids: set[str] = set()

    def write(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one line and flush it to the OS."""
        self._stream.write(_line(record))
        self._stream.flush()

    def sync(self) -> None:
        """Flush the stream (a pipe or terminal has nothing to fsync)."""
        self._stream.flush()

    def close(self) -> None:
        """Flush; standard output itself stays open for the rest of the process."""
        if not self._stream.closed:
            self._stream.flush()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some platforms and filesystems cannot open a directory; nothing more to do
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_sink(spec: str) -> Sink:
    """The sink named by ``spec``: ``-`` (or ``jsonl:-``) for stdout, else a JSONL file path
    (optionally written ``jsonl:PATH``). Raises :class:`SinkError` for a path that cannot be
    appended to."""
    if spec in STDOUT_SINKS:
        return StdoutSink()
    name = spec.removeprefix("jsonl:")
    if not name:
        raise SinkError("empty sink spec: expected a file path, jsonl:PATH, or - for stdout")
    path = Path(name).expanduser()
    if path.is_dir():
        raise SinkError(f"sink {path} is a directory, expected a file path")
    if not path.parent.is_dir():
        raise SinkError(f"cannot open sink {path}: no such directory {path.parent}")
    return JsonlSink(path)
