"""``tandem edge run`` as a user meets it: refusals are one line with exit status 2, resumed
work is announced, failures are counted in the summary and the exit status."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from tandem.cli import main
from tandem.data import load_data
from tandem.edge.spool import Spool


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    """Five labelled digits as JSON lines."""
    test = load_data("digits").test
    path = tmp_path / "in.jsonl"
    lines = [json.dumps({"input": test.x[i].tolist(), "label": int(test.y[i])}) for i in range(5)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _edge(bundle: Path, source: Path, *more: str) -> list[str]:
    return [
        "edge", "run", "--bundle", str(bundle), "--cloud", "127.0.0.1:1",
        "--source", f"jsonl:{source}", "--width", "0.5", "--bits", "4", *more,
    ]  # fmt: skip


def _sql(path: Path, *statements: str) -> None:
    """Run ``statements`` on the SQLite file at ``path`` and close it (releasing its locks)."""
    with closing(sqlite3.connect(path)) as db:
        for statement in statements:
            db.execute(statement)
        db.commit()


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 16)


def _header_then_garbage(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 16)


def _foreign(path: Path) -> None:
    _sql(path, "CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")


def _future_version(path: Path) -> None:
    Spool(path).close()
    _sql(path, "PRAGMA user_version = 99")


def _missing_table(path: Path) -> None:
    Spool(path).close()
    _sql(path, "DROP TABLE cursors")


def _directory(path: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_garbage, "not a readable spool"),
        (_header_then_garbage, "not a readable spool"),
        (_foreign, "not a spool"),
        (_future_version, "schema version 99"),
        (_missing_table, "missing tables"),
        (_directory, "is a directory"),
    ],
)
def test_a_spool_that_cannot_be_used_is_one_line_and_exit_2(
    tmp_path: Path,
    digits_bundle: Path,
    source: Path,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], None],
    says: str,
) -> None:
    spool = tmp_path / "x.spool"
    make(spool)
    code = main(_edge(digits_bundle, source, "--sink", str(tmp_path / "o.jsonl"),
                      "--spool", str(spool)))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("tandem: error: ") and says in err, err


def test_a_held_spool_is_one_line_and_exit_2(
    tmp_path: Path, digits_bundle: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = tmp_path / "x.spool"
    with Spool(spool):  # another daemon holds it
        code = main(_edge(digits_bundle, source, "--sink", str(tmp_path / "o.jsonl"),
                          "--spool", str(spool)))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "in use by another process" in err, err
