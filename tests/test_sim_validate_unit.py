"""The real-run harness fails fast instead of hanging when the daemon dies."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from tandem.sim.validate import _first_answer


def test_a_daemon_that_exits_before_answering_is_an_error(tmp_path: Path) -> None:
    dead = SimpleNamespace(returncode=2)
    with pytest.raises(RuntimeError, match="exited with 2 before answering"):
        asyncio.run(_first_answer(dead, tmp_path / "sink.jsonl"))  # type: ignore[arg-type]


def test_the_first_answer_ends_the_wait(tmp_path: Path) -> None:
    sink = tmp_path / "sink.jsonl"
    sink.write_text('{"input_index": 0}\n')
    alive = SimpleNamespace(returncode=None)
    asyncio.run(asyncio.wait_for(_first_answer(alive, sink), 5))  # type: ignore[arg-type]
