"""Fault test with real processes: no input lost, none duplicated, same answers.

2,000 MNIST test inputs go through a real edge daemon to a real cloud service. During the
run the cloud is killed with SIGKILL twice and restarted on the same port, and the daemon
is killed once and restarted over the same spool and sink. The sink must end with exactly
one result per input, equal to those of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from serving import ROOT, edge_command, server_process, sink_lines

N = 2000
ENV = {"OMP_NUM_THREADS": "1"}


def _wait(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Poll a condition on the processes' progress (bounded), since they share no events."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.02)


def _edge(bundle: Path, npz: Path, port: int, sink: Path) -> subprocess.Popen[str]:
    args = [
        "--bundle", str(bundle), "--cloud", f"127.0.0.1:{port}", "--source", f"npz:{npz}",
        "--sink", str(sink), "--limit", str(N), "--width", "0.25", "--bits", "4",
        "--no-fallback", "--concurrency", "16", "--head-batch", "16",
    ]  # fmt: skip
    env = {**os.environ, **ENV}
    return subprocess.Popen(
        edge_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT, env=env,
    )  # fmt: skip


def _finish(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out)


def _predictions(sink: Path) -> dict[int, int]:
    records = [json.loads(line) for line in sink.read_text().splitlines()]
    by_index = {r["input_index"]: r["prediction"] for r in records}
    assert len(records) == len(by_index) == N, "one line per input, no duplicates"
    assert len({r["request_id"] for r in records}) == N
    assert sorted(by_index) == list(range(N))
    return by_index


@pytest.mark.slow
def test_kill_9_cloud_twice_and_edge_once(tmp_path: Path, mnist_small: tuple[Path, Path]) -> None:
    bundle, npz = mnist_small
    repo = tmp_path / "repo"
    shutil.copytree(bundle, repo / "mnist", ignore=shutil.ignore_patterns("checkpoint"))
    serve = ["--models", str(repo), "--metrics-listen", "off"]

    with server_process(*serve, "--listen", "127.0.0.1:0", env=ENV) as (_, ready):
        port = ready["port"]
        _finish(_edge(bundle, npz, port, tmp_path / "reference.jsonl"))
    reference = _predictions(tmp_path / "reference.jsonl")

    sink = tmp_path / "faulty.jsonl"
    listen = ["--listen", f"127.0.0.1:{port}"]
    kills = []
    cloud = server_process(*serve, *listen, env=ENV)
    proc, _ = cloud.__enter__()
    edge = _edge(bundle, npz, port, sink)
    try:
        for threshold in (300, 800):
            _wait(lambda t=threshold: sink_lines(sink) >= t, f"{threshold} results")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            kills.append(("cloud", sink_lines(sink)))
            cloud.__exit__(None, None, None)
            cloud = server_process(*serve, *listen, env=ENV)
            proc, _ = cloud.__enter__()
        _wait(lambda: sink_lines(sink) >= 1200, "1200 results")
        edge.send_signal(signal.SIGKILL)
        edge.communicate(timeout=30)
        kills.append(("edge", sink_lines(sink)))
        edge = _edge(bundle, npz, port, sink)
        summary = _finish(edge)
    finally:
        if edge.poll() is None:
            edge.kill()
            edge.communicate()
        cloud.__exit__(None, None, None)

    assert all(done < N for _, done in kills), f"every kill landed mid-run: {kills}"
    assert summary["errors"] == 0
    assert _predictions(sink) == reference
