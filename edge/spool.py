"""Durable spool: every accepted input lives here until its result is in the sink.

The daemon's "no input lost, none duplicated" guarantee rests on three rules:

1. An input is *accepted* by writing it to the spool, in the same transaction that advances its
   source's cursor. After a crash the daemon resumes reading the source at the cursor, so an input
   is either in the spool (and will be sent) or not yet read (and will be read again), never both
   and never neither.
2. An entry is *completed* (deleted) only after its result line has been written to the sink. A
   crash in between leaves the entry pending; the sink's ``written_ids`` tell the restarted daemon
   that the line is already there, so it completes the entry without writing it twice.
3. The operating point chosen for an entry, and the encoded features themselves, are recorded
   (:meth:`Spool.assign`) before it is sent, so a retry or a restart resends exactly the same
   request: the server's idempotency cache then recognises it.

Storage is one SQLite file in WAL mode with ``synchronous=FULL``. WAL keeps a commit to a single
sequential append; FULL makes SQLite fsync the WAL at every commit, so an accepted entry survives
not only ``kill -9`` (which any mode survives, since the OS keeps written pages) but also a power
cut, which the default WAL setting (NORMAL) may roll back. The connection also takes SQLite's
exclusive locking mode: the first daemon holds the file for as long as it runs, and a second one
pointed at the same spool fails at once instead of sending the same entries again.

Threads: every method takes an internal lock and the connection is opened with
``check_same_thread=False``, so the daemon may call the spool from its event loop or push the
(fsync-bound) calls to a worker thread with ``asyncio.to_thread``. Only one process may use a
spool at a time (see above).
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.edge.closing import Closing
from tandem.stream_ids import join

__all__ = ["SCHEMA_VERSION", "Spool", "SpoolEntry", "SpoolError"]

log = logging.getLogger(__name__)

#: The layout written to ``PRAGMA user_version``; an unknown version is refused, not guessed at.
SCHEMA_VERSION = 1

_TABLES = {"pending", "cursors"}

_SCHEMA = """
CREATE TABLE pending (
    request_id  TEXT PRIMARY KEY NOT NULL,
    -- Insertion order. Explicit because SQLite may renumber implicit rowids on VACUUM.
    seq         INTEGER NOT NULL UNIQUE,
    source      TEXT NOT NULL,
    input_index INTEGER NOT NULL,
    label       INTEGER,
    data        BLOB NOT NULL,
    shape       TEXT NOT NULL,
    error       TEXT,
    width       REAL,
    bits        INTEGER,
    payload     BLOB,
    UNIQUE (source, input_index)
);
CREATE TABLE cursors (
    source     TEXT PRIMARY KEY NOT NULL,
    next_index INTEGER NOT NULL
);
"""

_COLUMNS = "request_id, input_index, label, data, shape, width, bits, error, payload"


class SpoolError(OSError):
    """The spool file is corrupt, of an unknown version, in use elsewhere, or unreadable.

    An OSError: like a file that cannot be opened, it is a fault of the environment, and the
    ``tandem`` command reports it in one line with exit status 2.
    """


@dataclass(frozen=True)
class SpoolEntry:
    """One pending input: what to send, and what has been decided about sending it.

    ``data`` holds the raw uint8 input in C order with shape ``shape``. An input that could not be
    read is spooled too, so that its error line reaches the sink exactly once like any result:
    it has ``error`` set, empty ``data`` and shape ``()``.
    """

    request_id: str
    input_index: int
    label: int | None
    data: bytes = field(repr=False)  # kept out of logs: it is the whole input
    shape: tuple[int, ...]
    width: float | None
    bits: int | None
    error: str | None = None
    payload: bytes | None = field(default=None, repr=False)  # encoded features, once assigned

    def array(self) -> np.ndarray:
        """The input as a read-only uint8 array of shape ``shape``."""
        if self.error is not None:
            raise ValueError(f"entry {self.request_id} has no input: {self.error}")
        return np.frombuffer(self.data, dtype=np.uint8).reshape(self.shape)


class Spool(Closing):
    """A durable queue of accepted inputs, one SQLite file (see the module docstring).

    ``Spool(path)`` creates the file if needed and raises :class:`SpoolError` if it is not a
    spool this version understands, or another process has it open.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        # 96 random bits per open: ids stay unique although seq restarts in an empty spool.
        self.namespace = secrets.token_urlsafe(12)
        self._last_seq = 0
        if self.path.is_dir():  # SQLite would only say "unable to open database file"
            raise SpoolError(f"{self.path}: is a directory, expected a spool file")
        try:
            # isolation_level=None: the module does its own BEGIN/COMMIT, so that a transaction
            # covers exactly what must be atomic and nothing is left implicitly open. A short
            # timeout: the only contender for the lock is another daemon, and waiting for it to
            # exit is not useful.
            self._db = sqlite3.connect(
                self.path, isolation_level=None, timeout=0.5, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise SpoolError(f"{self.path}: cannot open spool: {exc}") from exc
        try:
            self._setup()
        except sqlite3.OperationalError as exc:
            self._db.close()
            if "locked" in str(exc):
                raise SpoolError(f"{self.path}: spool is in use by another process") from exc
            raise SpoolError(f"{self.path}: cannot open spool: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise SpoolError(f"{self.path}: not a readable spool ({exc})") from exc
        except SpoolError:
            self._db.close()
            raise

    def _setup(self) -> None:
        db = self._db
        # Must precede the switch to WAL: in exclusive mode SQLite keeps the WAL index in process
        # memory instead of a shared-memory file, and holds the file lock until close.
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            # Still durable (a rollback journal with FULL sync), only slower: warn, don't refuse.
            log.warning("%s: WAL mode unavailable, using journal_mode=%s", self.path, mode)
        db.execute("PRAGMA synchronous=FULL")
        # BEGIN IMMEDIATE takes the write lock before looking, so two processes racing to create
        # the same fresh spool cannot both create it; in exclusive mode the lock is then kept.
        with self._transaction():
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {
                row[0]
                for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                if not str(row[0]).startswith("sqlite_")
            }
            if version == 0 and not tables:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version == 0:
                raise SpoolError(
                    f"{self.path}: not a spool (an SQLite file with tables {sorted(tables)})"
                )
            elif version != SCHEMA_VERSION:
                raise SpoolError(
                    f"{self.path}: spool schema version {version} is not supported "
                    f"(this version reads {SCHEMA_VERSION}); drain it with the version that "
                    "wrote it, or move it aside"
                )
            elif not _TABLES.issubset(tables):
                raise SpoolError(f"{self.path}: spool is missing tables {sorted(_TABLES - tables)}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed on success, rolled back on any error."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def _op(self, what: str) -> Iterator[None]:
        """Serialise one public operation and turn SQLite failures into a SpoolError."""
        with self._lock:
            try:
                yield
            except sqlite3.ProgrammingError as exc:
                # Raised for a closed connection: a caller bug, but worth a clear message.
                raise SpoolError(f"{self.path}: cannot {what}: {exc}") from exc
            except sqlite3.DatabaseError as exc:
                raise SpoolError(f"{self.path}: cannot {what}: {exc}") from exc

    def accept(
        self, source_key: str, items: Sequence[tuple[int, int | None, np.ndarray | str]]
    ) -> list[SpoolEntry]:
        """Spool ``items`` from ``source_key`` and advance its cursor, in one transaction.

        Each item is ``(input_index, label, x)`` with ``x`` the uint8 input array, or a string
        saying why the input could not be read (the entry then carries that error to the sink).
        Items are given in increasing index order, as sources yield them. An index that is
        already pending, or below the cursor (accepted before: pending or already in the sink),
        is skipped, so re-reading a source can never spool an input twice.

        Returns the entries actually spooled, with fresh request ids, in the given order.
        An id is ``NAMESPACE#SEQ`` (:func:`tandem.stream_ids.join`): this open spool's random
        namespace and the entry's ``seq``, so a stream can send the entry as a bare ``seq``.
        """
        with self._op("accept inputs"), self._transaction() as db:
            row = db.execute(
                "SELECT next_index FROM cursors WHERE source = ?", (source_key,)
            ).fetchone()
            start = int(row[0]) if row else 0
            # Past every seq this open has given out, not only the pending ones: an id must
            # not come back when the spool empties mid-run.
            seq = int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM pending").fetchone()[0])
            seq = max(seq, self._last_seq)
            accepted: list[SpoolEntry] = []
            top = -1
            for index, label, x in items:
                index = int(index)
                top = max(top, index)
                if index < start:
                    continue
                seq += 1
                entry = _entry(join(self.namespace, seq), index, label, x)
                inserted = db.execute(
                    "INSERT INTO pending (request_id, seq, source, input_index, label, data,"
                    " shape, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (source, input_index) DO NOTHING",
                    (
                        entry.request_id,
                        seq,
                        source_key,
                        index,
                        entry.label,
                        entry.data,
                        json.dumps(entry.shape),
                        entry.error,
                    ),
                ).rowcount
                if inserted:
                    accepted.append(entry)
            self._last_seq = seq
            if top >= 0:
                # MAX: a batch of only old indices must not move the cursor back.
                db.execute(
                    "INSERT INTO cursors (source, next_index) VALUES (?, ?) ON CONFLICT (source)"
                    " DO UPDATE SET next_index = MAX(next_index, excluded.next_index)",
                    (source_key, top + 1),
                )
            return accepted

    def cursor(self, source_key: str) -> int:
        """The next index to read from ``source_key``: one past the highest accepted, else 0."""
        with self._op("read cursor"):
            row = self._db.execute(
                "SELECT next_index FROM cursors WHERE source = ?", (source_key,)
            ).fetchone()
            return int(row[0]) if row else 0

    def assign(self, rows: Sequence[tuple[str, float, int | None, bytes]]) -> None:
        """Record ``(request_id, width, bits, payload)`` for entries, in one transaction.

        ``bits`` is None for an entropy-coded payload, whose header names its rate point.

        Every resend of an entry, after a retry or a restart, then carries these same bytes.
        Raises KeyError (and records nothing) if an entry is not pending.
        """
        with self._op("assign operating points"), self._transaction() as db:
            for request_id, width, bits, payload in rows:
                updated = db.execute(
                    "UPDATE pending SET width = ?, bits = ?, payload = ? WHERE request_id = ?",
                    (float(width), None if bits is None else int(bits), bytes(payload), request_id),
                ).rowcount
                if not updated:
                    raise KeyError(request_id)

    def pending(self, limit: int | None = None) -> list[SpoolEntry]:
        """Pending entries, oldest accepted first; at most ``limit`` of them if given."""
        with self._op("read pending entries"):
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM pending ORDER BY seq LIMIT ?",
                (-1 if limit is None else max(0, int(limit)),),
            ).fetchall()
        return [_from_row(row) for row in rows]

    def get(self, request_id: str) -> SpoolEntry | None:
        """The pending entry with this request id, or None."""
        with self._op("read entry"):
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM pending WHERE request_id = ?", (request_id,)
            ).fetchone()
        return None if row is None else _from_row(row)

    def complete(self, request_ids: Iterable[str]) -> None:
        """Delete entries whose results are in the sink, in one transaction; unknown ids are
        ignored, so completing twice (e.g. after a restart) is harmless."""
        ids = [(str(r),) for r in request_ids]
        if not ids:
            return
        with self._op("complete entries"), self._transaction() as db:
            db.executemany("DELETE FROM pending WHERE request_id = ?", ids)

    def clear(self) -> tuple[int, int]:
        """Discard every pending entry and every source cursor, in one transaction: the spool
        is then as new. Returns how many entries and cursors there were."""
        with self._op("clear the spool"), self._transaction() as db:
            pending = db.execute("DELETE FROM pending").rowcount
            cursors = db.execute("DELETE FROM cursors").rowcount
            return int(pending), int(cursors)

    def __len__(self) -> int:
        """The number of pending entries."""
        with self._op("count entries"):
            return int(self._db.execute("SELECT COUNT(*) FROM pending").fetchone()[0])

    def close(self) -> None:
        """Close the file (releasing the lock); safe to call twice."""
        with self._lock:
            self._db.close()


def _opt_int(value: int | None) -> int | None:
    return None if value is None else int(value)


def _entry(request_id: str, index: int, label: int | None, x: np.ndarray | str) -> SpoolEntry:
    """A fresh entry for one accepted item (validating the input before it is stored)."""
    if isinstance(x, str):
        return SpoolEntry(request_id, index, _opt_int(label), b"", (), None, None, x)
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
        raise TypeError(f"input {index}: expected a uint8 array, got {getattr(x, 'dtype', x)!r}")
    shape = tuple(int(d) for d in x.shape)
    data = np.ascontiguousarray(x).tobytes()
    return SpoolEntry(request_id, index, _opt_int(label), data, shape, None, None)


def _from_row(row: Any) -> SpoolEntry:
    """The entry stored in ``row``; a row that does not decode is quarantined: it comes back
    as an error entry (no input), so its error line reaches the sink and it leaves the spool
    like any other, instead of stopping every run that reads the spool."""
    request_id, index, label, data, shape, width, bits, error, payload = row
    try:
        return SpoolEntry(
            request_id=str(request_id),
            input_index=int(index),
            label=None if label is None else int(label),
            data=_blob(data),
            shape=tuple(int(d) for d in json.loads(shape)),
            width=None if width is None else float(width),
            bits=None if bits is None else int(bits),
            error=None if error is None else str(error),
            payload=None if payload is None else _blob(payload),
        )
    # RecursionError: absurdly nested JSON; TypeError: a value of the wrong kind (a number
    # where a list belongs, a blob where a number does).
    except (ValueError, TypeError, RecursionError) as exc:
        log.error("spool entry %s (input %s) is corrupt, quarantined: %s", request_id, index, exc)
        known = _int_or_none(index)
        return SpoolEntry(
            request_id=str(request_id),
            input_index=-1 if known is None else known,
            label=_int_or_none(label),
            data=b"",
            shape=(),
            width=None,
            bits=None,
            error=f"corrupt spool row, input dropped: {type(exc).__name__}: {exc}",
        )


def _blob(value: Any) -> bytes:
    """A BLOB column's bytes; TypeError for anything else (``bytes(n)`` of a number would
    allocate n bytes)."""
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return value


def _int_or_none(value: Any) -> int | None:
    """``value`` as an int, or None when it is missing or not a number."""
    try:
        return int(value)
    except (ValueError, TypeError):
        return None
