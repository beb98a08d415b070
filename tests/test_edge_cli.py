"""``tandem edge run`` as a user meets it: refusals are one line with exit status 2, resumed
work is announced, failures are counted in the summary and the exit status."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import tempfile
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

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


def _free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_rerun_says_what_it_resumed_and_fresh_starts_over(
    tmp_path: Path, digits_bundle: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sink = tmp_path / "o.jsonl"
    args = _edge(digits_bundle, source, "--sink", str(sink), "--fallback-after-s", "0.2")
    assert main(args) == 0
    first = capsys.readouterr().err
    assert "resum" not in first  # a new spool has nothing to resume
    assert main(args) == 0  # the source is consumed: nothing is served, and it says why
    again = capsys.readouterr().err
    assert "resuming spool" in again and "0 inputs pending" in again, again
    assert f"jsonl:{source} read up to index 5" in again and "--fresh" in again, again
    assert len(_lines(sink)) == 5
    assert main([*args, "--fresh"]) == 0
    fresh = capsys.readouterr().err
    assert "resum" not in fresh and "discarded" in fresh, fresh
    assert len(_lines(sink)) == 10  # served again, appended to the sink


def test_the_stdout_sink_gets_only_result_lines_and_leaves_no_spool(
    tmp_path: Path,
    digits_bundle: Path,
    source: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work, temp = tmp_path / "work", tmp_path / "temp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert main(_edge(digits_bundle, source, "--fallback-after-s", "0.2")) == 0
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 5 and all("request_id" in r for r in records)
    assert "inputs 5: 5 served" in err
    assert list(work.iterdir()) == []
    assert list(temp.iterdir()) == []  # the temporary spool went with the run


def test_inputs_left_in_a_temporary_spool_are_served_by_the_command_it_names(
    tmp_path: Path,
    digits_bundle: Path,
    source: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, the summary said "run again", and a rerun made a new temporary spool: the
    inputs left in the old one (for stdin, their only copy) were never served."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    args = _edge(digits_bundle, source, "--no-fallback", "--give-up-after-s", "0.5")
    args[args.index("127.0.0.1:1")] = f"127.0.0.1:{_free_port()}"
    assert main(args) == 3
    err = capsys.readouterr().err
    match = re.search(r"--spool (\S+)", err)
    assert match, err
    spool = Path(match.group(1))
    with Spool(spool) as held:
        assert len(held) == 5
    # The command it names serves them (locally, the cloud still being away).
    assert (
        main(_edge(digits_bundle, source, "--spool", str(spool), "--fallback-after-s", "0.2")) == 0
    )
    out = capsys.readouterr().out
    assert sorted(json.loads(line)["input_index"] for line in out.splitlines()) == list(range(5))


def test_a_run_with_failed_inputs_exits_1_and_counts_them(
    tmp_path: Path, digits_bundle: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with source.open("a") as fh:
        fh.write("{not json\n")
    sink = tmp_path / "o.jsonl"
    code = main(_edge(digits_bundle, source, "--sink", str(sink), "--fallback-after-s", "0.2"))
    out = capsys.readouterr().out
    assert code == 1
    assert "inputs 6: 5 served (5 locally), 1 failed" in out, out
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n[1]\n")
    code = main(_edge(digits_bundle, bad, "--sink", str(tmp_path / "b.jsonl")))
    out = capsys.readouterr().out
    assert code == 1
    assert "n/a (no labels)" not in out and "no input served" in out, out


def test_an_unreachable_cloud_without_fallback_is_reported_and_given_up(
    tmp_path: Path,
    digits_bundle: Path,
    source: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    spool = tmp_path / "o.spool"
    args = _edge(digits_bundle, source, "--sink", str(tmp_path / "o.jsonl"), "--spool",
                 str(spool), "--no-fallback", "--give-up-after-s", "1", "--json")  # fmt: skip
    args[args.index("127.0.0.1:1")] = f"127.0.0.1:{_free_port()}"
    code = main(args)
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert code == 3, err
    reports = [r for r in caplog.records if "not answering" in r.getMessage()]
    # The first failure is reported at once; the next report would be 30 s later.
    assert len(reports) == 1 and summary["retries"] > 1, caplog.text
    assert "gave up" in err and "5 inputs left pending" in err and str(spool) in err, err
    assert summary["pending"] == 5 and summary["served"] == 0
    with Spool(spool) as held:
        assert len(held) == 5


def test_cli_defaults_are_the_config_defaults(digits_bundle: Path) -> None:
    """Every ``edge run`` option left out gives DaemonConfig's own default: the parser repeats
    them only so --help can show them without importing the daemon."""
    from tandem.cli import build_parser
    from tandem.edge.cli import _config
    from tandem.edge.config import DaemonConfig

    base = ["--bundle", str(digits_bundle), "--cloud", "127.0.0.1:1", "--source", "digits"]
    from_cli = _config(build_parser().parse_args(["edge", "run", *base]))
    plain = DaemonConfig(bundle=digits_bundle, cloud="127.0.0.1:1", source="digits")
    assert from_cli.model_dump() == plain.model_dump()
    unary = _config(build_parser().parse_args(["edge", "run", *base, "--transport", "unary"]))
    assert unary.transport == "unary"


def test_a_json_failure_with_results_on_stdout_goes_to_stderr(
    tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stdout sink's lines are results only: the error document goes to stderr."""
    assert main(_edge(tmp_path / "no-bundle", source, "--json")) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert json.loads(err.splitlines()[-1])["type"]
    code = main(_edge(tmp_path / "no-bundle", source, "--json", "--sink", str(tmp_path / "o")))
    assert code == 2 and json.loads(capsys.readouterr().out)["type"]
