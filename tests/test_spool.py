"""The spool: accepted inputs persist, in order, until completed, across reopen and kill -9."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from tandem import stream_ids
from tandem.edge.spool import SCHEMA_VERSION, Spool, SpoolError

REPO = Path(__file__).resolve().parents[1]


Item = tuple[int, int | None, np.ndarray]


def _items(indices: range | list[int]) -> list[Item]:
    """Distinct little inputs: index ``i`` has label ``i % 3`` and pixels ``i, i+1, ...``."""
    return [(i, i % 3, (np.arange(6, dtype=np.uint8) + i).reshape(1, 2, 3)) for i in indices]


def test_accept_pending_complete(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        assert len(spool) == 0 and spool.pending() == []
        entries = spool.accept("npz:/a", _items(range(5)))
        assert [e.input_index for e in entries] == [0, 1, 2, 3, 4]
        assert len({e.request_id for e in entries}) == 5
        # NAMESPACE#SEQ: 96 random bits (base64url) and the insertion order, so a stream can
        # send each as a bare seq.
        keys = [stream_ids.split(e.request_id) for e in entries]
        assert [k[1] for k in keys if k] == [1, 2, 3, 4, 5]
        assert {k[0] for k in keys if k} == {spool.namespace} and len(spool.namespace) == 16
        pending = spool.pending()
        assert pending == entries
        first = pending[0]
        assert first.label == 0 and first.shape == (1, 2, 3)
        assert first.width is None and first.bits is None and first.error is None
        np.testing.assert_array_equal(first.array(), _items([0])[0][2])
        assert [e.input_index for e in spool.pending(limit=2)] == [0, 1]
        spool.complete([entries[1].request_id, entries[3].request_id])
        assert [e.input_index for e in spool.pending()] == [0, 2, 4]
        spool.complete([entries[1].request_id, "no-such-id"])  # twice is harmless
        assert len(spool) == 3
        assert spool.get(entries[0].request_id) == entries[0]
        assert spool.get(entries[1].request_id) is None


def test_ids_are_never_given_out_twice(tmp_path: Path) -> None:
    # A spool that empties mid-run goes on numbering; a reopened one (which numbers from its
    # pending entries) has a new namespace.
    ids = []
    for _ in range(2):
        with Spool(tmp_path / "s.db") as spool:
            for _ in range(2):
                entries = spool.accept(f"npz:/{len(ids)}", _items(range(2)))
                ids += [e.request_id for e in entries]
                spool.complete(e.request_id for e in entries)
    assert len(set(ids)) == len(ids) == 8


def test_cursor_and_duplicates(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        assert spool.cursor("npz:/a") == 0
        spool.accept("npz:/a", _items(range(3)))
        assert spool.cursor("npz:/a") == 3
        assert spool.cursor("npz:/b") == 0
        # Pending indices and indices below the cursor are skipped; new ones go in.
        again = spool.accept("npz:/a", _items([1, 2, 3, 4]))
        assert [e.input_index for e in again] == [3, 4]
        assert spool.cursor("npz:/a") == 5
        # Completed entries stay accepted: re-reading them must not spool them twice.
        spool.complete(e.request_id for e in spool.pending())
        assert spool.accept("npz:/a", _items(range(5))) == []
        assert spool.cursor("npz:/a") == 5 and len(spool) == 0
        # The same index from another source is a different input.
        assert len(spool.accept("npz:/b", _items([0]))) == 1
        # Duplicates inside one batch are spooled once.
        assert [e.input_index for e in spool.accept("npz:/c", _items([0, 0, 1]))] == [0, 1]


def test_insertion_order_across_sources(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        spool.accept("b", _items([7]))
        spool.accept("a", _items([0]))
        spool.accept("b", _items([8]))
        assert [(e.input_index) for e in spool.pending()] == [7, 0, 8]
        spool.complete([e.request_id for e in spool.pending()])
        spool.accept("a", _items([1]))
        assert [e.input_index for e in spool.pending()] == [1]


def test_error_entries(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        [bad] = spool.accept("dir:/x", [(0, None, "cannot read image a.png")])
        assert bad.error == "cannot read image a.png" and bad.data == b"" and bad.shape == ()
        with pytest.raises(ValueError, match="cannot read"):
            bad.array()
        assert spool.pending() == [bad]
        with pytest.raises(TypeError, match="uint8"):
            spool.accept("dir:/x", [(1, None, np.zeros((1, 2, 2), np.float32))])
        assert spool.cursor("dir:/x") == 1  # the failed batch was rolled back whole


def test_assign_persists(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Spool(path) as spool:
        a, b = spool.accept("k", _items(range(2)))
        spool.assign([(a.request_id, 16.0, 4, b"features")])
        with pytest.raises(KeyError):
            spool.assign([("missing", 1.0, 8, b"")])
    with Spool(path) as spool:
        first, second = spool.pending()
        assert (first.width, first.bits, first.payload) == (16.0, 4, b"features")
        assert (second.width, second.bits, second.payload) == (None, None, None)
        assert spool.cursor("k") == 2
        np.testing.assert_array_equal(second.array(), b.array())


def test_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    script = textwrap.dedent(
        f"""
        import os, signal
        import numpy as np
        from tandem.edge.spool import Spool
        spool = Spool({str(path)!r})
        for batch in range(5):
            indices = range(batch * 20, batch * 20 + 20)
            spool.accept("npz:/data", [(i, i, np.full((1, 4, 4), i, np.uint8)) for i in indices])
        first = spool.pending(limit=1)[0].request_id
        spool.assign([(first, 8.0, 2, b"xyz")])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    with Spool(path) as spool:
        pending = spool.pending()
        assert [e.input_index for e in pending] == list(range(100))
        assert all(e.label == e.input_index for e in pending)
        np.testing.assert_array_equal(pending[42].array(), np.full((1, 4, 4), 42, np.uint8))
        assert (pending[0].width, pending[0].bits, pending[0].payload) == (8.0, 2, b"xyz")
        assert spool.cursor("npz:/data") == 100


def test_second_process_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Spool(path), pytest.raises(SpoolError, match="in use"):
        Spool(path)
    Spool(path).close()  # released on close


def test_unknown_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Spool(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(SpoolError, match="schema version 2 is not supported"):
        Spool(path)


def test_foreign_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (x)")
    db.commit()
    db.close()
    with pytest.raises(SpoolError, match="not a spool"):
        Spool(path)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not an SQLite database\n" * 200)
    with pytest.raises(SpoolError, match="not a readable spool"):
        Spool(path)


def test_empty_file_is_a_fresh_spool(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.touch()
    with Spool(path) as spool:
        assert len(spool) == 0


def test_file_is_wal(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Spool(path).close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()


def test_a_row_that_cannot_be_decoded_is_an_error_entry(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Spool(path) as spool:
        entries = spool.accept("npz:/a", _items(range(4)))
    with closing(sqlite3.connect(path)) as db:
        db.execute("UPDATE pending SET shape = 'not json' WHERE input_index = 1")
        db.execute("UPDATE pending SET width = 'wide' WHERE input_index = 2")
        db.execute("UPDATE pending SET data = 1000000000000 WHERE input_index = 3")
        db.commit()
    with Spool(path) as spool:
        pending = spool.pending()
        assert [e.input_index for e in pending] == [0, 1, 2, 3]
        assert pending[0] == entries[0]
        for bad in pending[1:]:
            assert bad.error is not None and bad.error.startswith("corrupt spool row")
            assert bad.request_id == entries[bad.input_index].request_id
            assert bad.label == entries[bad.input_index].label and bad.data == b""
        assert spool.get(entries[1].request_id) == pending[1]
        spool.complete([e.request_id for e in pending[1:]])
        assert len(spool) == 1
