"""A federation's adapter, published into a running cloud service, answers edge requests."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from federation import simulate
from serving import config, make_repo, requests_for, running

from tandem.edge.config import DaemonConfig
from tandem.edge.daemon import EdgeDaemon
from tandem.federated.client_app import app as client_app
from tandem.federated.config import FedConfig
from tandem.federated.task import Wire, domain_inputs, resolved
from tandem.wire.v1 import split_inference_pb2 as pb
from tandem.wire.v1 import split_inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

NODES = 3


def _federation(
    tmp_path: Path, digits_bundle: Path, **extra: Any
) -> tuple[Path, dict[str, Any], np.ndarray, np.ndarray]:
    """A model repository holding the digits bundle, a short federation's settings that publish
    into it, and the shifted test images (and labels) its server measures accuracy on."""
    repo = make_repo(tmp_path, digits_bundle)
    settings = {
        "bundle": str(repo / "digits"), "publish": str(repo / "digits"), "num-rounds": 2,
        "min-nodes": NODES, "max-samples": 150, "eval-samples": 50, "local-epochs": 2,
        "personal-epochs": 0, "round-timeout": 120.0, "out": str(tmp_path / "out"), **extra,
    }  # fmt: skip
    cfg = FedConfig.from_run_config(settings)
    domains = cfg.domain_list()
    inputs = [domain_inputs(cfg.data, domains[p], cfg.eval_samples, p) for p in range(NODES)]
    return (
        repo,
        settings,
        np.concatenate([x for x, _ in inputs]),
        np.concatenate([y for _, y in inputs]),
    )


def test_published_adapter_is_hot_loaded_and_matches_the_reported_accuracy(
    digits_bundle: Path, tmp_path: Path
) -> None:
    repo, settings, x, y = _federation(tmp_path, digits_bundle)
    cfg = FedConfig.from_run_config(settings)
    width, bits = resolved(Wire(cfg.bundle))

    async def scenario() -> tuple[dict, list]:  # type: ignore[type-arg]
        async with running(config(repo)) as server:
            # The service starts before the adapter exists, and is never restarted.
            result = await asyncio.to_thread(simulate, settings, client_app, NODES)
            requests = requests_for(digits_bundle, x, width, bits)
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.SplitInferenceStub(channel)
                for r in requests:
                    r.adapter = cfg.adapter_name
                # At most 32 calls at once, as the edge daemon sends: past the server's
                # --max-streams-per-connection, calls are refused (UNAVAILABLE) to be retried.
                gate = asyncio.Semaphore(32)

                async def infer(r: pb.InferRequest) -> pb.InferResponse:
                    async with gate:
                        return await stub.Infer(r)

                answers = await asyncio.gather(*(infer(r) for r in requests))
        return result, list(answers)

    result, answers = asyncio.run(scenario())
    assert result["published"] == [str(repo / "digits" / "adapters" / "federated" / "1")]
    assert {(a.adapter, a.adapter_version) for a in answers} == {("federated", "1")}
    served = float(np.mean([a.top[0].index for a in answers] == y))
    assert served == pytest.approx(result["global_accuracy"], abs=1e-6)
    assert result["global_accuracy"] != result["frozen_accuracy"]  # the adapter did change it


def _npz_source(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """An npz whose test split (its last 10,000 rows) starts with ``x``, padded with blanks;
    ``limit=len(x)`` sends exactly ``x``."""
    blank = np.zeros((1 + 10_000 - len(x), *x.shape[2:]), np.uint8)
    images = np.concatenate([blank[:1], x[:, 0], blank[1:]])
    labels = np.concatenate([np.zeros(1, np.int64), y, np.zeros(len(blank) - 1, np.int64)])
    np.savez(path, x=images, y=labels)
    return path


def test_a_head_and_tail_adapter_serve_the_edge_daemon_with_the_reported_accuracy(
    digits_bundle: Path, tmp_path: Path
) -> None:
    repo, settings, x, y = _federation(tmp_path, digits_bundle, **{"head-targets": "auto"})
    cfg = FedConfig.from_run_config(settings)
    bundle = repo / "digits"
    width, bits = resolved(Wire(cfg.bundle))
    source = _npz_source(tmp_path / "shifted.npz", x, y)

    def daemon(address: str, sink: str, **options: Any) -> DaemonConfig:
        return DaemonConfig(
            bundle=bundle, cloud=address, source=f"npz:{source}", sink=str(tmp_path / sink),
            limit=len(x), fallback=False, **options,
        )  # fmt: skip

    async def scenario() -> tuple[dict, dict, dict]:  # type: ignore[type-arg]
        async with running(config(repo)) as server:
            result = await asyncio.to_thread(simulate, settings, client_app, NODES)
            # The head part alone: it names its tail part, width and bits.
            head = Path(result["published"][0])
            adapted = await EdgeDaemon(
                daemon(server.address, "adapted.jsonl", head_adapter=head)
            ).run()
            # The cloud's adapter alone, fed by an unadapted head, is not what was trained.
            tail_only = await EdgeDaemon(
                daemon(
                    server.address, "tail.jsonl", adapter=cfg.adapter_name, width=width, bits=bits
                )
            ).run()
        return result, adapted, tail_only

    result, adapted, tail_only = asyncio.run(scenario())
    assert result["published"] == [
        str(bundle / part / "federated" / "1") for part in ("head-adapters", "adapters")
    ]
    assert adapted["served"] == len(x) and adapted["errors"] == adapted["served_locally"] == 0
    lines = [json.loads(line) for line in (tmp_path / "adapted.jsonl").read_text().splitlines()]
    assert {(line["width"], line["bits"]) for line in lines} == {(width, bits)}
    assert adapted["accuracy"] == pytest.approx(result["global_accuracy"], abs=1e-6)
    assert result["global_accuracy"] != result["frozen_accuracy"]
    assert tail_only["accuracy"] != adapted["accuracy"]


def test_a_federation_at_a_rate_point_serves_the_daemon_with_the_reported_accuracy(
    digits_entropy_bundle: Path, tmp_path: Path
) -> None:
    """On a bundle with an entropy model, ``point`` makes the clients train decoder + tail on
    the decoded, rounded symbols of that rate point; the published adapter then serves the
    daemon's entropy-coded requests at exactly the accuracy the federation reported."""
    repo, settings, x, y = _federation(tmp_path, digits_entropy_bundle, point=0)
    bundle = repo / "digits"
    width = 1.0  # the widest, as the federation's width 0 means
    source = _npz_source(tmp_path / "shifted.npz", x, y)

    def daemon(address: str, adapter: str) -> DaemonConfig:
        sink = tmp_path / f"{adapter or 'frozen'}.jsonl"
        return DaemonConfig(
            bundle=bundle, cloud=address, source=f"npz:{source}", sink=str(sink), limit=len(x),
            fallback=False, adapter=adapter, width=width, point=0,
        )  # fmt: skip

    async def scenario() -> tuple[dict, dict, dict]:  # type: ignore[type-arg]
        async with running(config(repo)) as server:
            result = await asyncio.to_thread(simulate, settings, client_app, NODES)
            runs = {}
            for adapter in ("federated", ""):
                runs[adapter] = await EdgeDaemon(daemon(server.address, adapter)).run()
        return result, runs["federated"], runs[""]

    result, adapted, frozen = asyncio.run(scenario())
    assert result["published"] == [str(bundle / "adapters" / "federated" / "1")]
    lines = [json.loads(line) for line in (tmp_path / "federated.jsonl").read_text().splitlines()]
    assert {(line["width"], line["bits"], line["point"]) for line in lines} == {(width, None, 0)}
    assert adapted["served"] == len(x) and adapted["errors"] == 0
    assert adapted["accuracy"] == pytest.approx(result["global_accuracy"], abs=1e-6)
    assert frozen["accuracy"] == pytest.approx(result["frozen_accuracy"], abs=1e-6)
    assert result["global_accuracy"] != result["frozen_accuracy"]


def test_a_rate_point_excludes_bits_and_head_targets() -> None:
    base = {"bundle": "b", "point": 0}
    with pytest.raises(ValueError, match="exclude each other"):
        FedConfig.from_run_config({**base, "bits": 4})
    with pytest.raises(ValueError, match="only decoder \\+ tail adapt"):
        FedConfig.from_run_config({**base, "head-targets": "auto"})
