"""Sinks: JSON lines written whole, repaired and reconciled on reopen, intact after kill -9."""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tandem.edge.sinks import JsonlSink, SinkError, StdoutSink, open_sink

REPO = Path(__file__).resolve().parents[1]


def _records(n: int, first: int = 0) -> list[dict[str, object]]:
    return [{"request_id": f"r{i}", "input_index": i, "pred": i % 10} for i in range(first, n)]


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_write_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with JsonlSink(path, fsync_every=2) as sink:
        assert sink.written_ids == set()
        for record in _records(5):
            sink.write(record)
        sink.write({"error": "no request id"})
        assert sink.written_ids == {f"r{i}" for i in range(5)}
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 6
    assert text.splitlines()[0] == '{"request_id":"r0","input_index":0,"pred":0}'  # compact
    assert _lines(path)[:5] == _records(5)


def test_append_and_recover_ids(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with JsonlSink(path) as sink:
        for record in _records(3):
            sink.write(record)
    with JsonlSink(path) as sink:
        assert sink.written_ids == {"r0", "r1", "r2"}
        sink.write(_records(4, first=3)[0])
    assert [r["request_id"] for r in _lines(path)] == ["r0", "r1", "r2", "r3"]


def test_partial_last_line_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "out.jsonl"
    complete = "".join(json.dumps(r) + "\n" for r in _records(2))
    path.write_text(complete + '{"request_id":"r2","input_in')
    with caplog.at_level(logging.WARNING), JsonlSink(path) as sink:
        assert sink.written_ids == {"r0", "r1"}
        assert path.read_text() == complete  # repaired before anything is appended
        sink.write(_records(3, first=2)[0])
    assert "partial last line" in caplog.text
    assert [r["request_id"] for r in _lines(path)] == ["r0", "r1", "r2"]


def test_single_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"request_id":"r0"')  # killed during the very first write
    with JsonlSink(path) as sink:
        assert sink.written_ids == set()
    assert path.read_bytes() == b""


def test_corrupt_and_foreign_lines_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(
        '{"request_id":"r0"}\n'
        "this is not json\n"
        "\n"
        '{"request_id":"r1"}\n'
        '{"no_request_id":1}\n'
        '["request_id"]\n'
        '{"request_id":7}\n'
        '{"request_id":"r2"\n'
    )
    with caplog.at_level(logging.WARNING), JsonlSink(path) as sink:
        assert sink.written_ids == {"r0", "r1"}
    assert "ignored 2 line(s)" in caplog.text and "line 2" in caplog.text
    assert path.read_text().count("\n") == 8  # complete lines are kept, even bad ones


def test_fsync_every_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fsync_every"):
        JsonlSink(tmp_path / "out.jsonl", fsync_every=0)


def test_killed_writer_leaves_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    n = 137
    script = textwrap.dedent(
        f"""
        import os, signal
        from tandem.edge.sinks import JsonlSink
        sink = JsonlSink({str(path)!r}, fsync_every=1000)  # no fsync before the kill
        for i in range({n}):
            sink.write({{"request_id": f"r{{i}}", "input_index": i, "pad": "x" * (i * 7)}})
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert path.read_bytes().endswith(b"\n")
    assert [r["input_index"] for r in _lines(path)] == list(range(n))
    with JsonlSink(path) as sink:
        assert sink.written_ids == {f"r{i}" for i in range(n)}


def test_stdout_sink(capsys: pytest.CaptureFixture[str]) -> None:
    with StdoutSink() as sink:
        sink.write({"request_id": "a", "pred": 1})
        sink.sync()
        assert sink.written_ids == set()  # stdout cannot be read back
    assert capsys.readouterr().out == '{"request_id":"a","pred":1}\n'
    stream = io.StringIO()
    StdoutSink(stream).write({"x": 1})
    assert stream.getvalue() == '{"x":1}\n'


def test_open_sink(tmp_path: Path) -> None:
    assert isinstance(open_sink("-"), StdoutSink)
    assert isinstance(open_sink("jsonl:-"), StdoutSink)
    for spec in (str(tmp_path / "a.jsonl"), f"jsonl:{tmp_path / 'b.jsonl'}"):
        sink = open_sink(spec)
        assert isinstance(sink, JsonlSink)
        sink.close()
        sink.close()  # twice is harmless
    assert (tmp_path / "a.jsonl").exists() and (tmp_path / "b.jsonl").exists()
    with pytest.raises(SinkError, match="directory"):
        open_sink(str(tmp_path))
    with pytest.raises(SinkError, match="no such directory"):
        open_sink(str(tmp_path / "absent" / "out.jsonl"))
    with pytest.raises(SinkError, match="empty"):
        open_sink("")
