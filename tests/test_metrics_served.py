"""The served metrics add up: every request counted once, refused ones included; and a real
Prometheus scrapes them.

One server with a tokens file receives a known mix of calls: refused for their token, for
bytes that do not parse, for an unknown model, for a width the bundle lacks, and answered.
``tandem_requests_total`` must hold exactly that mix, and ``tandem_errors_total`` exactly its
failures. The Prometheus test runs the Debian ``prometheus`` binary against the metrics port
and asks its HTTP API for the same total; it skips when the binary is not installed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import config, make_repo, requests_for, running

from tandem.cloud.server import CloudServer
from tandem.data import load_data
from tandem.wire.v1 import split_inference_pb2 as pb
from tandem.wire.v1 import split_inference_pb2_grpc as pb_grpc

TOKEN = "token-acme-0001"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
TIMEOUT = 20.0
PROMETHEUS = shutil.which("prometheus")

# (method, model, code) -> how many of the calls below end so.
EXPECTED = Counter(
    {
        ("Infer", "", "UNAUTHENTICATED"): 1,
        ("ListModels", "", "UNAUTHENTICATED"): 1,
        ("Infer", "", "INVALID_ARGUMENT"): 1,
        ("Infer", "", "NOT_FOUND"): 1,
        ("Infer", "digits", "INVALID_ARGUMENT"): 1,
        ("Infer", "digits", "OK"): 2,
        ("InferStream", "digits", "OK"): 2,
        ("InferStream", "", "NOT_FOUND"): 1,
        ("ListModels", "", "OK"): 1,
        ("GetServerInfo", "", "INVALID_ARGUMENT"): 1,
    }
)


@pytest.fixture()
def repo(tmp_path: Path, digits_bundle: Path) -> Path:
    return make_repo(tmp_path, digits_bundle)


@pytest.fixture()
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({TOKEN: "acme"}))
    return path


async def _code(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _send_the_mix(server: CloudServer, digits_bundle: Path) -> None:
    """The calls :data:`EXPECTED` counts."""
    good = requests_for(digits_bundle, load_data("digits").test.x[:6], 1.0, 8)
    unknown, bad_width = good[4], good[5]
    unknown.model = "no-such-model"
    bad_width.width = 0.3
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.SplitInferenceStub(channel)
        raw = channel.unary_unary("/tandem.v1.SplitInference/Infer")
        raw_info = channel.unary_unary("/tandem.v1.SplitInference/GetServerInfo")
        codes = [
            await _code(stub.Infer(good[0], timeout=TIMEOUT)),  # no token
            await _code(stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT)),  # no token
            await _code(raw(b"\xff\xff", metadata=AUTH, timeout=TIMEOUT)),
            await _code(stub.Infer(unknown, metadata=AUTH, timeout=TIMEOUT)),
            await _code(stub.Infer(bad_width, metadata=AUTH, timeout=TIMEOUT)),
            await _code(stub.Infer(good[0], metadata=AUTH, timeout=TIMEOUT)),
            await _code(stub.Infer(good[1], metadata=AUTH, timeout=TIMEOUT)),
            await _code(stub.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=TIMEOUT)),
            await _code(raw_info(b"\xff\xff", metadata=AUTH, timeout=TIMEOUT)),
        ]
        assert codes.count(grpc.StatusCode.OK) == 3, codes
        stream = stub.InferStream(iter([good[2], good[3], unknown]), metadata=AUTH, timeout=30)
        results = [r async for r in stream]
        assert len(results) == 3


def _counted(text: str, name: str) -> Counter[tuple[str, str, str]]:
    counts: Counter[tuple[str, str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                key = (s.labels["method"], s.labels["model"], s.labels["code"])
                counts[key] += int(s.value)
    return counts


def test_every_request_is_counted_once_with_its_code_and_model(
    repo: Path, tokens: Path, digits_bundle: Path
) -> None:
    async def main() -> str:
        async with running(config(repo, tokens=tokens)) as server:
            await _send_the_mix(server, digits_bundle)
            return server.metrics.text()

    text = asyncio.run(main())
    assert _counted(text, "tandem_requests_total") == EXPECTED
    failed = Counter({k: n for k, n in EXPECTED.items() if k[2] != "OK"})
    assert _counted(text, "tandem_errors_total") == failed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def _scraped_total(port: int, deadline: float) -> float:
    """sum(tandem_requests_total) once Prometheus has scraped it, polling until ``deadline``."""
    while True:
        try:
            result = _query(port, "sum(tandem_requests_total)")
        except OSError:  # Prometheus not listening yet
            result = []
        if result:
            return float(result[0]["value"][1])
        if time.monotonic() > deadline:
            raise AssertionError("Prometheus scraped nothing in time")
        time.sleep(0.2)


@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")
def test_a_real_prometheus_scrapes_the_counts(
    repo: Path, tokens: Path, digits_bundle: Path, tmp_path: Path
) -> None:
    assert PROMETHEUS is not None
    web_port = _free_port()

    async def main() -> tuple[float, list[dict[str, Any]], list[dict[str, Any]]]:
        async with running(config(repo, tokens=tokens)) as server:
            await _send_the_mix(server, digits_bundle)
            settings = tmp_path / "prometheus.yml"
            settings.write_text(
                "global: {scrape_interval: 1s}\n"
                "scrape_configs:\n"
                "  - job_name: tandem\n"
                f"    static_configs: [{{targets: ['127.0.0.1:{server.metrics_port}']}}]\n"
            )
            log = (tmp_path / "prometheus.log").open("w")
            prometheus = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={settings}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{web_port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                deadline = time.monotonic() + 60
                total = await asyncio.to_thread(_scraped_total, web_port, deadline)
                up = await asyncio.to_thread(_query, web_port, 'up{job="tandem"}')
                errors = await asyncio.to_thread(
                    _query, web_port, "sum by (model, code) (tandem_errors_total)"
                )
                return total, up, errors
            finally:
                prometheus.terminate()
                try:
                    prometheus.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    prometheus.kill()
                    prometheus.wait(timeout=30)
                log.close()

    total, up, errors = asyncio.run(main())
    assert total == sum(EXPECTED.values())
    assert [float(r["value"][1]) for r in up] == [1.0]
    by_model_code = {(r["metric"].get("model", ""), r["metric"]["code"]) for r in errors}
    assert ("digits", "INVALID_ARGUMENT") in by_model_code
    assert ("", "UNAUTHENTICATED") in by_model_code
