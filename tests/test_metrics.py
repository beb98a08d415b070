"""Prometheus metrics: values in the exposition text, and the HTTP exporter's lifecycle."""

from __future__ import annotations

import platform
import socket
import urllib.request
from collections import Counter

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import tandem
from tandem import codec
from tandem.cloud.metrics import ServiceMetrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition text, keyed by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _key(name: str, method: str, model: str, code: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, (("code", code), ("method", method), ("model", model))


def _by_code(got: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for (sample, labels), value in got.items():
        if sample == name:
            counts[dict(labels)["code"]] += int(value)
    return counts


def _observe(metrics: ServiceMetrics) -> None:
    metrics.observe_request("Infer", "digits", "OK")
    metrics.observe_request("Infer", "digits", "OK")
    metrics.observe_request("InferStream", "cifar", "OK")
    metrics.observe_request("Infer", "", "UNAUTHENTICATED")
    metrics.observe_request("Infer", "", "NOT_FOUND")
    metrics.observe_request("Infer", "", "NOT_FOUND")
    metrics.observe_request("InferStream", "digits", "INVALID_ARGUMENT")
    metrics.observe_stages(queue_s=0.0002, decode_s=0.003, compute_s=0.04)
    metrics.observe_total(0.05)
    for size in (1, 3, 8, 9, 300):
        metrics.observe_batch(size)
    metrics.add_bytes(1000)
    metrics.add_bytes(24)
    metrics.set_queue_depth(5)
    metrics.set_models_loaded(2)


def test_values_in_text() -> None:
    metrics = ServiceMetrics()
    _observe(metrics)
    got = samples(metrics.text())
    assert got[_key("tandem_requests_total", "Infer", "digits", "OK")] == 2
    assert got[_key("tandem_requests_total", "InferStream", "cifar", "OK")] == 1
    assert got[_key("tandem_requests_total", "Infer", "", "NOT_FOUND")] == 2
    assert got[_key("tandem_errors_total", "Infer", "", "NOT_FOUND")] == 2
    assert got[_key("tandem_errors_total", "Infer", "", "UNAUTHENTICATED")] == 1
    assert got[_key("tandem_errors_total", "InferStream", "digits", "INVALID_ARGUMENT")] == 1
    # One population: the errors are exactly the requests that did not end OK.
    requests = _by_code(got, "tandem_requests_total")
    errors = _by_code(got, "tandem_errors_total")
    assert sum(requests.values()) == 7
    assert errors == {code: n for code, n in requests.items() if code != "OK"}
    assert got[("tandem_received_bytes_total", ())] == 1024
    assert got[("tandem_queue_depth", ())] == 5
    assert got[("tandem_models_loaded", ())] == 2
    # Batch buckets are cumulative: 1 | 3 | 8 | 9 | 300 (above the last finite bucket).
    batch = {le: got[("tandem_batch_size_bucket", (("le", le),))] for le in ("1.0", "4.0", "8.0")}
    assert batch == {"1.0": 1, "4.0": 2, "8.0": 3}
    assert got[("tandem_batch_size_bucket", (("le", "256.0"),))] == 4
    assert got[("tandem_batch_size_bucket", (("le", "+Inf"),))] == 5
    assert got[("tandem_batch_size_count", ())] == 5
    assert got[("tandem_batch_size_sum", ())] == 321


def test_stage_latencies() -> None:
    metrics = ServiceMetrics()
    _observe(metrics)
    got = samples(metrics.text())

    def bucket(stage: str, le: str) -> float:
        return got[("tandem_request_seconds_bucket", (("le", le), ("stage", stage)))]

    # Each stage lands in the first bucket at or above it, from 0.1 ms up to 10 s.
    assert bucket("queue", "0.0001") == 0 and bucket("queue", "0.00025") == 1
    assert bucket("decode", "0.0025") == 0 and bucket("decode", "0.005") == 1
    assert bucket("compute", "0.025") == 0 and bucket("compute", "0.05") == 1
    assert bucket("total", "0.05") == 1
    assert bucket("total", "10.0") == 1
    for stage in ("queue", "decode", "compute", "total"):
        assert got[("tandem_request_seconds_count", (("stage", stage),))] == 1


def test_stages_exist_before_any_observation() -> None:
    got = samples(ServiceMetrics().text())
    for stage in ("queue", "decode", "compute", "total"):
        assert got[("tandem_request_seconds_count", (("stage", stage),))] == 0


def test_instances_have_separate_registries() -> None:
    a, b = ServiceMetrics(), ServiceMetrics()
    a.observe_batch(4)
    assert samples(a.text())[("tandem_batch_size_count", ())] == 1
    assert samples(b.text())[("tandem_batch_size_count", ())] == 0


def test_given_registry_is_used() -> None:
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry)
    metrics.add_bytes(7)
    assert registry.get_sample_value("tandem_received_bytes_total") == 7


def _refused(port: int) -> bool:
    """Whether a TCP connection to 127.0.0.1:``port`` is refused."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def test_http_exporter() -> None:
    metrics = ServiceMetrics()
    port, stop = metrics.serve("127.0.0.1", 0)
    try:
        assert port > 0
        _observe(metrics)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            body = response.read().decode()
        got = samples(body)
        assert got[("tandem_batch_size_bucket", (("le", "8.0"),))] == 3
        assert got[_key("tandem_requests_total", "Infer", "digits", "OK")] == 2
        assert got[("tandem_queue_depth", ())] == 5
    finally:
        stop()
    assert _refused(port)
    stop()  # a second stop is harmless


def test_several_exporters_at_once() -> None:
    servers = [ServiceMetrics(), ServiceMetrics()]
    started = [m.serve("127.0.0.1", 0) for m in servers]
    try:
        servers[1].observe_batch(2)
        counts = []
        for port, _ in started:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
                counts.append(samples(response.read().decode())[("tandem_batch_size_count", ())])
        assert counts == [0, 1]
    finally:
        for _, stop in started:
            stop()


def test_build_info_process_and_gc_series_and_no_created_series() -> None:
    metrics = ServiceMetrics()
    _observe(metrics)
    got = samples(metrics.text())
    build = (
        ("codec_version", str(codec.VERSION)),
        ("python", platform.python_version()),
        ("version", tandem.__version__),
    )
    assert got[("tandem_build_info", build)] == 1
    assert got[("process_resident_memory_bytes", ())] > 0
    assert got[("process_start_time_seconds", ())] > 0
    assert any(name.startswith("python_gc_") for name, _ in got)
    assert not [name for name, _ in got if name.endswith("_created")]
