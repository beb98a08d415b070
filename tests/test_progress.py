"""Long work: a bar on a terminal, a throttled heartbeat of plain lines off one."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tandem import progress
from tandem.progress import bar


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _heartbeat_due(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a process that has run longer than the interval: the next line is due."""
    monkeypatch.setattr(progress._Lines, "last_line_at", float("-inf"))


def test_off_a_terminal_each_heartbeat_is_one_plain_line() -> None:
    out = _Pipe()
    steps = bar(range(3), total=3, desc="teacher 1/2", out=out, every_s=0)
    for i in steps:
        steps.set_postfix(loss=f"{i:.1f}", refresh=False)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "teacher 1/2: 0/3 [00:00<?]"
    assert any(line.startswith("teacher 1/2: 3/3 [") and "loss=" in line for line in lines)


def test_off_a_terminal_bars_share_one_heartbeat_interval() -> None:
    """A bar per epoch must not make the heartbeat faster: within the interval, one line."""
    out = _Pipe()
    for epoch in range(5):
        with bar(total=10, desc=f"epoch {epoch + 1}/5", out=out, every_s=3600) as b:
            b.update(10)
    assert out.getvalue().splitlines() == ["epoch 1/5: 0/10 [00:00<?]"]


def test_off_a_terminal_the_heartbeat_ignores_json_quiet() -> None:
    out = _Pipe()
    with bar(total=2, desc="measuring", show=False, out=out, every_s=0) as b:
        b.update(2)
    assert out.getvalue().startswith("measuring: 0/2")


def test_on_a_terminal_a_hidden_bar_writes_nothing() -> None:
    out = _Terminal()
    with bar(total=2, desc="measuring", show=False, out=out) as b:
        b.update(2)
    assert out.getvalue() == ""


def test_a_short_command_prints_no_heartbeat() -> None:
    out = _Pipe()
    progress.beat("too early", out=out, every_s=0)  # due: the fixture says so
    progress._Lines.last_line_at = time.monotonic()  # as a process just started
    with bar(total=2, desc="profiling", out=out, every_s=3600) as b:
        b.update(2)
    assert out.getvalue() == "too early\n"


def test_train_off_a_terminal_says_it_is_alive(tmp_path: Path) -> None:
    """Before, ``tandem train`` with stderr in a file printed nothing until it finished."""
    done = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "train", "digits", "--data", "digits",
         "--out", str(tmp_path / "b"), "--set", "teacher.train.epochs=1",
         "--set", "distill.head.epochs=1", "--set", "distill.finetune.epochs=1",
         "--set", "eval_bits=[4]", "--set", "default_bits=4"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "TANDEM_HEARTBEAT_S": "0.5"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines and all(": " in line and "/" in line for line in lines), done.stderr


def test_a_beat_is_a_throttled_line_off_a_terminal_and_nothing_on_one() -> None:
    out = _Pipe()
    progress.beat("fed simulate: round 1", out=out, every_s=3600)
    progress.beat("fed simulate: round 2", out=out, every_s=3600)
    assert out.getvalue() == "fed simulate: round 1\n"
    terminal = _Terminal()
    progress.beat("fed simulate: round 3", out=terminal, every_s=0)
    assert terminal.getvalue() == ""
