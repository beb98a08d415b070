"""The edge daemon against an in-process cloud service, over real gRPC on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from serving import ROOT, config, edge_command, make_repo, running, sink_lines

from tandem.adapters import save_adapter
from tandem.bundle import load_full, read_manifest
from tandem.data import load_data, normalize
from tandem.edge.config import DaemonConfig
from tandem.edge.daemon import EdgeDaemon
from tandem.edge.sinks import JsonlSink
from tandem.edge.spool import Spool
from tandem.evaluate import evaluate_bundle


@pytest.fixture()
def repo(tmp_path: Path, digits_bundle: Path) -> Path:
    return make_repo(tmp_path, digits_bundle)


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An npz source whose test split (its last 10,000 rows) starts with the digits test set.

    Padding fills the rest, so ``limit=len(digits test)`` sends exactly the digits test set.
    """
    test = load_data("digits").test
    pad = 10_000 - len(test)
    x = np.concatenate(
        [np.zeros((1, 8, 8), np.uint8), test.x[:, 0], np.zeros((pad, 8, 8), np.uint8)]
    )
    y = np.concatenate([np.zeros(1, np.int64), test.y, np.zeros(pad, np.int64)])
    path = tmp_path_factory.mktemp("npz") / "digits.npz"
    np.savez(path, x=x, y=y)
    return path


def _free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(cfg: DaemonConfig, repo: Path | None, **server: Any) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        if repo is None:
            return await EdgeDaemon(cfg).run()
        async with running(config(repo, **server)) as srv:
            return await EdgeDaemon(cfg.model_copy(update={"cloud": srv.address})).run()

    return asyncio.run(main())


def _cfg(tmp_path: Path, bundle: Path, source: str, **fields: Any) -> DaemonConfig:
    values = {
        "bundle": bundle,
        "cloud": "127.0.0.1:1",
        "source": source,
        "sink": str(tmp_path / "out.jsonl"),
        "concurrency": 8,
        **fields,
    }
    return DaemonConfig.model_validate(values)


def test_served_accuracy_equals_eval(
    tmp_path: Path, repo: Path, digits_bundle: Path, digits_npz: Path
) -> None:
    test = load_data("digits").test
    cfg = _cfg(tmp_path, digits_bundle, f"npz:{digits_npz}", width=0.5, bits=4, limit=len(test))
    summary = _run(cfg, repo)
    records = _records(tmp_path / "out.jsonl")
    assert len(records) == summary["served"] == len(test)
    assert sorted(r["input_index"] for r in records) == list(range(len(test)))
    report = evaluate_bundle(digits_bundle, test, [4])
    (point,) = [p for p in report["points"] if p["width"] == 0.5]
    served_acc = np.mean([r["prediction"] == r["label"] for r in records])
    assert summary["accuracy"] == served_acc
    assert served_acc == point["accuracy"]
    first = records[0]
    assert set(first) == {
        "request_id",
        "input_index",
        "prediction",
        "class_name",
        "model_version",
        "label",
        "width",
        "bits",
        "point",
        "bytes_sent",
        "latency_ms",
        "served_by",
    }
    assert first["width"] == 0.5 and first["bits"] == 4 and first["point"] is None
    assert first["served_by"] != "local"
    manifest = read_manifest(digits_bundle)
    assert first["class_name"] == manifest.input.labels[first["prediction"]]
    assert first["model_version"] == manifest.version
    assert summary["errors"] == 0 and summary["served_locally"] == 0
    assert not (tmp_path / "out.jsonl.spool").exists() or _spool_empty(tmp_path / "out.jsonl.spool")


def _spool_empty(path: Path) -> bool:
    with Spool(path) as spool:
        return len(spool) == 0


def test_policy_picks_points_from_the_table(
    tmp_path: Path, repo: Path, digits_bundle: Path, digits_npz: Path
) -> None:
    cfg = _cfg(tmp_path, digits_bundle, f"npz:{digits_npz}", limit=200, slo_ms=1000)
    summary = _run(cfg, repo)
    records = _records(tmp_path / "out.jsonl")
    assert summary["served"] == 200
    table = {(p.width, p.bits) for p in read_manifest(digits_bundle).table}
    assert {(r["width"], r["bits"]) for r in records} <= table


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_a_rate_point_served_has_the_accuracy_eval_measured(
    tmp_path: Path, digits_entropy_bundle: Path, digits_npz: Path, transport: str
) -> None:
    """Pinned to a width and rate point, the daemon sends entropy-coded payloads whose
    answers are exactly ``tandem eval``'s for that point, and its records name the point.
    Over the stream a request is its payload and a few bytes; a unary call carries names."""
    test = load_data("digits").test
    repo = make_repo(tmp_path, digits_entropy_bundle)
    cfg = _cfg(tmp_path, digits_entropy_bundle, f"npz:{digits_npz}", width=0.5, point=1,
               limit=len(test), transport=transport)  # fmt: skip
    summary = _run(cfg, repo)
    records = _records(tmp_path / "out.jsonl")
    assert summary["served"] == len(test) and summary["errors"] == 0
    assert {(r["width"], r["bits"], r["point"]) for r in records} == {(0.5, None, 1)}
    report = evaluate_bundle(digits_entropy_bundle, test, [4])
    (point,) = [p for p in report["points"] if p["width"] == 0.5 and p["point"] == 1]
    assert np.mean([r["prediction"] == r["label"] for r in records]) == point["accuracy"]
    envelope = np.mean([r["bytes_sent"] for r in records]) - point["bytes_per_sample"]
    # Stream: context, seq, payload tag and answers_read. Unary: the id, model and version too.
    assert 0 < envelope < 10 if transport == "stream" else envelope > 30


def test_policy_picks_among_rate_points(
    tmp_path: Path, digits_entropy_bundle: Path, digits_npz: Path
) -> None:
    """With ``point`` fixed and the width left open, the policy picks widths among that rate
    point's rows of the table."""
    repo = make_repo(tmp_path, digits_entropy_bundle)
    cfg = _cfg(tmp_path, digits_entropy_bundle, f"npz:{digits_npz}", point=0, limit=100,
               slo_ms=1000)  # fmt: skip
    summary = _run(cfg, repo)
    records = _records(tmp_path / "out.jsonl")
    assert summary["served"] == 100
    table = {(p.width, p.point) for p in read_manifest(digits_entropy_bundle).table}
    assert {(r["width"], r["point"]) for r in records} <= table
    assert {r["point"] for r in records} == {0} and {r["bits"] for r in records} == {None}


def test_unreachable_cloud_falls_back_to_the_local_model(
    tmp_path: Path, digits_bundle: Path, digits_npz: Path
) -> None:
    port = _free_port()
    cfg = _cfg(
        tmp_path,
        digits_bundle,
        f"npz:{digits_npz}",
        cloud=f"127.0.0.1:{port}",
        width=0.5,
        bits=4,
        limit=40,
        fallback_after_s=0.5,
    )
    summary = _run(cfg, None)
    records = _records(tmp_path / "out.jsonl")
    assert summary["served_locally"] == 40 == len(records)
    assert {r["served_by"] for r in records} == {"local"}
    x = np.stack([np.load(digits_npz)["x"][-10_000 + r["input_index"]][None] for r in records])
    full = load_full(digits_bundle)
    assert full is not None
    m = read_manifest(digits_bundle)
    with torch.inference_mode():
        want = full(normalize(x, m.input.mean, m.input.std)).argmax(1).tolist()
    assert [r["prediction"] for r in records] == want


def test_final_errors_are_written_not_retried(
    tmp_path: Path, repo: Path, digits_bundle: Path, digits_npz: Path
) -> None:
    cfg = _cfg(
        tmp_path,
        digits_bundle,
        f"npz:{digits_npz}",
        model="nope",
        width=0.5,
        bits=4,
        limit=10,
        fallback=False,
    )
    summary = _run(cfg, repo)
    records = _records(tmp_path / "out.jsonl")
    assert summary["errors"] == 10 == len(records)
    assert all(r["error"].startswith("NOT_FOUND") for r in records)


def test_bad_json_lines_become_error_records(
    tmp_path: Path, repo: Path, digits_bundle: Path
) -> None:
    test = load_data("digits").test
    lines = [json.dumps({"input": test.x[i].tolist(), "label": int(test.y[i])}) for i in range(5)]
    lines.insert(2, "{not json")
    lines.insert(4, json.dumps({"input": [[1, 2], [3, 4]]}))
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path, digits_bundle, f"jsonl:{src}", width=1.0, bits=8)
    summary = _run(cfg, repo)
    records = sorted(_records(tmp_path / "out.jsonl"), key=lambda r: r["input_index"])
    assert [("error" in r) for r in records] == [False, False, True, False, True, False, False]
    assert summary["served"] == 5 and summary["errors"] == 2


def test_policy_serves_locally_when_the_local_model_is_faster(
    tmp_path: Path, repo: Path, digits_bundle: Path, digits_npz: Path
) -> None:
    # No split point can meet a 1 µs SLO, and the whole tiny model runs locally in about a
    # millisecond, well under the 50 ms round trip the policy assumes before measuring.
    cfg = _cfg(tmp_path, digits_bundle, f"npz:{digits_npz}", limit=20, slo_ms=0.001)
    summary = _run(cfg, repo)
    records = _records(tmp_path / "out.jsonl")
    assert summary["served_locally"] == 20
    assert {(r["served_by"], r["width"], r["bits"], r["bytes_sent"]) for r in records} == {
        ("local", None, None, 0)
    }


def test_inputs_the_head_cannot_take_get_error_lines_and_the_rest_is_served(
    tmp_path: Path, repo: Path, digits_bundle: Path, digits_npz: Path
) -> None:
    # A spool left by a run with another bundle: its inputs have the wrong shape for this one.
    cfg = _cfg(tmp_path, digits_bundle, f"npz:{digits_npz}", width=0.5, bits=4, limit=6)
    with Spool(cfg.spool_path()) as spool:
        spool.accept(f"npz:{digits_npz}", [(i, 0, np.zeros((1, 4, 4), np.uint8)) for i in range(3)])
    summary = _run(cfg, repo)
    records = sorted(_records(tmp_path / "out.jsonl"), key=lambda r: r["input_index"])
    assert [r["input_index"] for r in records] == list(range(6))
    assert ["error" in r for r in records] == [True] * 3 + [False] * 3
    assert records[0]["error"].startswith("cannot encode input")
    assert summary["errors"] == 3 and summary["served"] == 3


def test_a_failing_sink_fails_the_run_and_keeps_the_inputs(
    tmp_path: Path,
    repo: Path,
    digits_bundle: Path,
    digits_npz: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def full_disk(self: JsonlSink, record: dict) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(JsonlSink, "write", full_disk)
    cfg = _cfg(tmp_path, digits_bundle, f"npz:{digits_npz}", width=0.5, bits=4, limit=10)
    with pytest.raises(RuntimeError, match="edge worker failed"):
        _run(cfg, repo)
    with Spool(cfg.spool_path()) as spool:
        assert len(spool) == 10, "nothing left the spool without a result"


def test_stop_returns_while_the_cloud_is_down_and_keeps_the_inputs(
    tmp_path: Path, digits_bundle: Path, digits_npz: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tandem.edge.daemon

    monkeypatch.setattr(tandem.edge.daemon, "STOP_GRACE_S", 0.2)
    port = _free_port()
    cfg = _cfg(
        tmp_path, digits_bundle, f"npz:{digits_npz}", cloud=f"127.0.0.1:{port}",
        width=0.5, bits=4, limit=20, fallback=False,
    )  # fmt: skip

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        daemon = EdgeDaemon(cfg, stop=stop)
        task = asyncio.ensure_future(daemon.run())
        while not cfg.spool_path().exists() or daemon.stats.retries < 3:
            await asyncio.sleep(0.01)  # polling the daemon's own progress, bounded below
        stop.set()
        return await asyncio.wait_for(task, 30)

    summary = asyncio.run(main())
    assert summary["served"] == 0
    with Spool(cfg.spool_path()) as spool:
        assert len(spool) == 20


def test_a_trickle_on_a_stream_is_served_without_waiting_for_a_batch(
    tmp_path: Path, repo: Path, digits_bundle: Path
) -> None:
    test = load_data("digits").test
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    cfg = _cfg(tmp_path, digits_bundle, f"jsonl:{fifo}", width=0.5, bits=4, head_batch=32)
    sink = tmp_path / "out.jsonl"
    line = json.dumps({"input": test.x[0].tolist(), "label": int(test.y[0])}) + "\n"

    async def main() -> dict[str, Any]:
        async with running(config(repo)) as srv:
            task = asyncio.ensure_future(
                EdgeDaemon(cfg.model_copy(update={"cloud": srv.address})).run()
            )
            # Read-write: opening never blocks, and closing it ends the stream.
            writer = os.fdopen(os.open(fifo, os.O_RDWR), "w")
            writer.write(line)
            writer.flush()
            # One input, far from a batch of 32: it must still come out while the stream
            # stays open.
            deadline = asyncio.get_running_loop().time() + 30
            while sink_lines(sink) < 1:
                assert asyncio.get_running_loop().time() < deadline, "the input was held back"
                await asyncio.sleep(0.01)
            writer.close()
            return await asyncio.wait_for(task, 30)

    summary = asyncio.run(main())
    assert summary["served"] == 1


def test_an_input_the_local_model_cannot_take_gets_an_error_line(
    tmp_path: Path, repo: Path, digits_bundle: Path, digits_npz: Path
) -> None:
    # Left in the spool by a run with another bundle, and routed to the local model by the
    # policy (nothing meets a 1 µs SLO): the input fails alone, the run goes on.
    cfg = _cfg(tmp_path, digits_bundle, f"npz:{digits_npz}", limit=4, slo_ms=0.001)
    with Spool(cfg.spool_path()) as spool:
        spool.accept(f"npz:{digits_npz}", [(0, 0, np.zeros((3, 8, 8), np.uint8))])
    summary = _run(cfg, repo)
    records = sorted(_records(tmp_path / "out.jsonl"), key=lambda r: r["input_index"])
    assert records[0]["error"].startswith("cannot serve input")
    assert [r["served_by"] for r in records[1:]] == ["local"] * 3
    assert summary["errors"] == 1


def test_sigterm_stops_a_daemon_reading_an_idle_stdin_cleanly(
    tmp_path: Path, digits_bundle: Path
) -> None:
    test = load_data("digits").test
    sink = tmp_path / "out.jsonl"
    args = [
        "--bundle", str(digits_bundle), "--cloud", "127.0.0.1:1", "--source", "-",
        "--sink", str(sink), "--width", "0.5", "--bits", "4", "--fallback-after-s", "0.2",
    ]  # fmt: skip
    proc = subprocess.Popen(
        edge_command(*args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdin is not None
        proc.stdin.write((json.dumps({"input": test.x[0].tolist()}) + "\n").encode())
        proc.stdin.flush()
        # Its answer (local: the cloud is unreachable) means the reader thread has moved on
        # to wait for the next line, inside a read on stdin.
        deadline = time.monotonic() + 60
        while sink_lines(sink) < 1:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)  # stdin stays open: the reader is still blocked in its read
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert json.loads(out)["served_locally"] == 1


def _head_adapter(path: Path, **metadata: Any) -> Path:
    """A rank-1 LoRA on the digits encoder's first conv, with ``metadata`` in tandem.json."""
    a, b = torch.full((1, 1, 3, 3), 0.1), torch.full((16, 1, 1, 1), 0.1)
    save_adapter(path, lora={"body.0.0": (a, b)}, rank=1, alpha=1.0,
                 target_modules=["body.0.0"], metadata=metadata or None)  # fmt: skip
    return path


def test_a_federated_head_adapter_picks_its_tail_adapter_width_and_bits(
    tmp_path: Path, digits_bundle: Path
) -> None:
    pair = {"name": "fed", "version": "3"}
    head = _head_adapter(tmp_path / "h3", tail_adapter=pair, width=0.5, bits=4)
    cfg = _cfg(tmp_path, digits_bundle, "-", head_adapter=head).paired()
    assert (cfg.adapter, cfg.adapter_version, cfg.width, cfg.bits) == ("fed", "3", 0.5, 4)
    mine = _cfg(tmp_path, digits_bundle, "-", head_adapter=head, adapter="fed", width=1.0).paired()
    assert (mine.adapter_version, mine.width, mine.bits) == ("3", 1.0, 4)  # given options stand
    for other in ({"adapter": "other"}, {"adapter_version": "2"}):
        with pytest.raises(ValueError, match="tail adapter fed version 3"):
            _cfg(tmp_path, digits_bundle, "-", head_adapter=head, **other).paired()

    alone = _head_adapter(tmp_path / "h1", tail_adapter=None, width=0.5, bits=4)
    assert _cfg(tmp_path, digits_bundle, "-", head_adapter=alone).paired().adapter == ""
    with pytest.raises(ValueError, match="bundle's own tail"):
        _cfg(tmp_path, digits_bundle, "-", head_adapter=alone, adapter="fed").paired()

    plain = _head_adapter(tmp_path / "plain")  # not from a federation: nothing to pair
    cfg = _cfg(tmp_path, digits_bundle, "-", head_adapter=plain, adapter="x")
    assert cfg.paired() == cfg
    odd = _head_adapter(tmp_path / "odd", tail_adapter={"name": "fed"}, width=0.5, bits=4)
    with pytest.raises(ValueError, match="null or a name and version"):
        _cfg(tmp_path, digits_bundle, "-", head_adapter=odd).paired()


def _rolled_bundle(src: Path, out: Path) -> str:
    """A copy of ``src`` under the same name whose tail answers class ``(c + 1) % n`` where
    ``src``'s answers ``c``: an unrelated tail for ``src``'s head. Returns its version."""
    from safetensors.torch import load_file, save_file

    from tandem.bundle import MANIFEST, TAIL_FILE, sha256_file

    shutil.copytree(src, out, ignore=shutil.ignore_patterns("checkpoint"))
    state = load_file(str(out / TAIL_FILE))
    for key in ("tail.fc.weight", "tail.fc.bias"):
        state[key] = torch.roll(state[key], 1, dims=0).contiguous()
    save_file(state, str(out / TAIL_FILE))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"][TAIL_FILE] = sha256_file(out / TAIL_FILE)
    manifest["version"] = manifest["version"][::-1]  # any other name will do
    (out / MANIFEST).write_text(json.dumps(manifest))
    return str(manifest["version"])


def test_the_daemon_pins_its_bundle_version_when_a_new_one_is_dropped_in(
    tmp_path: Path, digits_bundle: Path, digits_npz: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(
        digits_bundle, repo / "digits" / "1", ignore=shutil.ignore_patterns("checkpoint")
    )
    mine = read_manifest(digits_bundle).version
    n = 40

    def cfg(sink: str) -> DaemonConfig:
        return _cfg(tmp_path, digits_bundle, f"npz:{digits_npz}", sink=str(tmp_path / sink),
                    width=0.5, bits=4, limit=n, fallback=False)  # fmt: skip

    async def main() -> list[dict[str, Any]]:
        async with running(config(repo)) as srv:
            summaries = []
            for step, sink in enumerate(("v1.jsonl", "v2.jsonl", "gone.jsonl")):
                if step == 1:  # a new version under the same name: the newest for the service
                    other = _rolled_bundle(digits_bundle, repo / "digits" / "2")
                    await srv.rescan(force=True)
                if step == 2:  # the version this head pairs with is gone
                    shutil.rmtree(repo / "digits" / "1")
                    await srv.rescan(force=True)
                run = cfg(sink).model_copy(update={"cloud": srv.address})
                summaries.append(await EdgeDaemon(run).run())
            assert other != mine
            return summaries

    first, second, gone = asyncio.run(main())
    before = sorted(_records(tmp_path / "v1.jsonl"), key=lambda r: r["input_index"])
    after = sorted(_records(tmp_path / "v2.jsonl"), key=lambda r: r["input_index"])
    assert len(before) == len(after) == n and first["errors"] == second["errors"] == 0
    assert [r["prediction"] for r in after] == [r["prediction"] for r in before]
    assert {r["model_version"] for r in before + after} == {mine}
    # Without its version the service has nothing this head may talk to: a clear refusal
    # for every input, logged once, not retried.
    refused = _records(tmp_path / "gone.jsonl")
    assert len(refused) == n == gone["errors"] and gone["retries"] == 0
    assert all(r["error"].startswith("NOT_FOUND") and mine in r["error"] for r in refused)
    logged = [r for r in caplog.records if "NOT_FOUND" in r.getMessage()]
    assert len(logged) == 1 and mine in logged[0].getMessage()


def test_a_corrupt_spool_row_is_quarantined_and_the_rest_served(
    tmp_path: Path, repo: Path, digits_bundle: Path, digits_npz: Path
) -> None:
    cfg = _cfg(tmp_path, digits_bundle, f"npz:{digits_npz}", width=0.5, bits=4, limit=40)
    with np.load(digits_npz) as archive:
        x, y = archive["x"][-10_000:][:40], archive["y"][-10_000:][:40]
    with Spool(cfg.spool_path()) as spool:
        spool.accept(f"npz:{digits_npz}", [(i, int(y[i]), x[i][None]) for i in range(40)])
    with closing(sqlite3.connect(cfg.spool_path())) as db:
        db.execute("UPDATE pending SET shape = '[1, 8, ' WHERE input_index = 7")
        db.commit()
    summary = _run(cfg, repo)
    records = sorted(_records(tmp_path / "out.jsonl"), key=lambda r: r["input_index"])
    assert [r["input_index"] for r in records] == list(range(40))
    assert ["error" in r for r in records] == [i == 7 for i in range(40)]
    assert "corrupt spool row" in records[7]["error"]
    assert summary["served"] == 39 and summary["errors"] == 1
    assert _spool_empty(cfg.spool_path())


def _write_lines(writer: Any, start: int, count: int) -> None:
    test = load_data("digits").test
    for i in range(start, start + count):
        writer.write(json.dumps({"input": test.x[i].tolist(), "label": int(test.y[i])}) + "\n")
    writer.flush()


async def _until(condition: Any, what: str, timeout_s: float = 60) -> None:
    """Poll ``condition`` until it holds, failing after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_the_cloud_going_down_and_back_is_reported_once_each(
    tmp_path: Path, repo: Path, digits_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    port = _free_port()
    sink = tmp_path / "out.jsonl"
    cfg = _cfg(tmp_path, digits_bundle, f"jsonl:{fifo}", cloud=f"127.0.0.1:{port}", width=0.5,
               bits=4, concurrency=4, fallback_after_s=0.2, probe_s=0.2)  # fmt: skip

    async def main() -> dict[str, Any]:
        task = asyncio.ensure_future(EdgeDaemon(cfg).run())
        writer = os.fdopen(os.open(fifo, os.O_RDWR), "w")
        try:
            _write_lines(writer, 0, 12)  # the cloud is down: served locally
            await _until(lambda: sink_lines(sink) >= 12, "local answers")
            async with running(config(repo, listen=f"127.0.0.1:{port}")):
                # One input at a time until the daemon finds the cloud again (it retries it
                # every probe_s), for at most 200 inputs.
                for n in range(12, 212):
                    _write_lines(writer, n % 100, 1)
                    await _until(lambda n=n: sink_lines(sink) > n, "an answer")
                    if _records(sink)[-1]["served_by"] != "local":
                        break
                writer.close()
                return await asyncio.wait_for(task, 60)
        finally:
            if not writer.closed:
                writer.close()
            if not task.done():
                task.cancel()

    summary = asyncio.run(main())
    assert summary["served_locally"] >= 12 and summary["served"] > summary["served_locally"]
    # One report when the outage starts, one when it ends; none per input. (A reminder, "still
    # not answering", may come after 30 s on a slow machine: a report per outage allows it.)
    down = [r for r in caplog.records if "is not answering" in r.getMessage()]
    back = [r for r in caplog.records if "answering again" in r.getMessage()]
    assert len(down) == 1 and len(back) == 1, caplog.text


def test_a_heartbeat_says_how_far_the_run_has_come(
    tmp_path: Path, repo: Path, digits_bundle: Path
) -> None:
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    sink = tmp_path / "out.jsonl"
    cfg = _cfg(tmp_path, digits_bundle, f"jsonl:{fifo}", width=0.5, bits=4)
    notes: list[str] = []

    async def main() -> dict[str, Any]:
        async with running(config(repo)) as srv:
            daemon = EdgeDaemon(cfg.model_copy(update={"cloud": srv.address}),
                                notify=notes.append, heartbeat_s=0.05)  # fmt: skip
            task = asyncio.ensure_future(daemon.run())
            with os.fdopen(os.open(fifo, os.O_RDWR), "w") as writer:
                _write_lines(writer, 0, 3)
                await _until(lambda: sink_lines(sink) >= 3, "three answers")
                await _until(lambda: "3 processed (0 failed), 0 pending" in notes, "a heartbeat")
            return await asyncio.wait_for(task, 60)

    assert asyncio.run(main())["served"] == 3


def test_streams_cut_mid_run_lose_nothing_and_answer_nothing_twice(
    tmp_path: Path, repo: Path, digits_bundle: Path, digits_npz: Path
) -> None:
    """The service closes every connection after 0.3 s, cutting the daemon's stream with
    requests unanswered: they go again on a new stream under the same keys, and every input
    gets exactly one line, with eval's accuracy. The service computes an input at most once
    more per resend (what it was computing for a departed caller it drops)."""
    test = load_data("digits").test
    # One input per head pass and few in flight: the run spans several connections.
    cfg = _cfg(tmp_path, digits_bundle, f"npz:{digits_npz}", width=0.5, bits=4,
               limit=len(test), head_batch=1, concurrency=4)  # fmt: skip

    async def main() -> tuple[dict[str, Any], float]:
        server_cfg = config(repo, max_connection_age_s=0.3, drain_grace_s=0.05)
        async with running(server_cfg) as srv:
            summary = await EdgeDaemon(cfg.model_copy(update={"cloud": srv.address})).run()
            registry = srv.metrics.registry
            rows = registry.get_sample_value("tandem_batch_size_sum") or 0.0
        return summary, rows

    summary, rows = asyncio.run(main())
    records = _records(tmp_path / "out.jsonl")
    assert summary["served"] == len(records) == len(test) and summary["errors"] == 0
    assert sorted(r["input_index"] for r in records) == list(range(len(test)))
    assert summary["retries"] > 0 and summary["served_locally"] == 0  # resent, not local
    assert len(test) <= rows <= len(test) + summary["retries"]
    report = evaluate_bundle(digits_bundle, test, [4])
    (point,) = [p for p in report["points"] if p["width"] == 0.5]
    assert np.mean([r["prediction"] == r["label"] for r in records]) == point["accuracy"]
