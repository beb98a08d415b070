"""The Flower ServerApp: run the rounds, measure the adapters, publish them to the cloud.

Settings come from the run config (``[tool.flwr.app.config]`` in ``pyproject.toml``, or
``flwr run . --run-config 'key=value ...'``); see ``federated.config``. With ``out`` set, the
run's summary is written to ``OUT/result.json``; with ``publish`` set to a bundle directory in a
cloud model repository, the global adapter (and with ``publish-personal`` each client's) is
written there as a new adapter version, which a running service picks up without a restart.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from federated.config import FedConfig
from federated.lora import Arrays, attach, lora_arrays, merge_into, resolve_targets
from federated.publish import publish_adapter
from federated.rounds import Evaluate, RoundLog, personalise, run_rounds
from federated.strategies import build_strategy
from federated.task import Features, Wire, accuracy, domain_test, tail_model

log = logging.getLogger(__name__)


def initial_adapter(cfg: FedConfig) -> Arrays:
    """A fresh adapter at the largest rank: A random (seeded), B zero, so it changes nothing."""
    model = tail_model(cfg.bundle)
    targets = resolve_targets(model, cfg.targets)
    return lora_arrays(attach(model, targets, cfg.max_rank, cfg.alpha, seed=cfg.seed))


def shifted_test(cfg: FedConfig, clients: int) -> Features:
    """The test slice seen through each client's domain, all of them together."""
    wire = Wire(cfg.bundle, cfg.width, cfg.bits)
    domains = cfg.domain_list()
    parts = [
        domain_test(
            wire, cfg.data, domains[p % len(domains)], cfg.eval_samples, cfg.seed * 1000 + p
        )
        for p in range(clients)
    ]
    return Features(torch.cat([p.z for p in parts]), torch.cat([p.y for p in parts]))


def evaluator(cfg: FedConfig, test: Features) -> Evaluate:
    """(adapter, scale) -> accuracy of the bundle with that adapter merged, on ``test``."""

    def evaluate(arrays: Arrays, scale: float) -> float:
        model = tail_model(cfg.bundle)
        if arrays:
            merge_into(model, arrays, scale)
        return accuracy(model, test)

    return evaluate


def run_federation(grid: Grid, cfg: FedConfig) -> dict[str, Any]:
    """The whole federation; returns (and with ``out`` writes) its summary."""
    clients = max(cfg.min_nodes, len(list(grid.get_node_ids())))
    evaluate = evaluator(cfg, shifted_test(cfg, clients))
    initial = initial_adapter(cfg)
    strategy = build_strategy(cfg, initial)
    published: list[str] = []

    def on_round(rnd: int, arrays: ArrayRecord, _: RoundLog) -> None:
        if cfg.publish and cfg.publish_every and rnd % cfg.publish_every == 0:
            published.append(_publish(cfg, strategy.global_adapter(arrays), strategy.scale))

    frozen = evaluate({}, 1.0)
    arrays, logs = run_rounds(grid, cfg, strategy, strategy.first_arrays(initial), evaluate,
                              on_round)  # fmt: skip
    final = strategy.global_adapter(arrays)
    summary: dict[str, Any] = {
        "strategy": cfg.strategy, "rounds": [r.as_dict() for r in logs],
        "frozen_accuracy": frozen, "global_accuracy": evaluate(final, strategy.scale),
        "tail_fp32_bytes": tail_bytes(cfg.bundle), "scale": strategy.scale,
    }  # fmt: skip
    if cfg.personal_epochs:
        personal, plog = personalise(grid, cfg, strategy, arrays)
        summary["personal"] = plog.as_dict()
        if cfg.publish and cfg.publish_personal:
            for p, adapter in sorted(personal.items()):
                published.append(_publish(cfg, adapter, strategy.scale, f"-client{p}"))
    just_published = cfg.publish_every and cfg.num_rounds % cfg.publish_every == 0
    if cfg.publish and final and not just_published:
        published.append(_publish(cfg, final, strategy.scale))
    summary["published"] = published
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def tail_bytes(bundle: str) -> int:
    """The bundle's decoder + tail weights in float32, in bytes."""
    return sum(p.numel() * 4 for p in tail_model(bundle).parameters())


def _publish(cfg: FedConfig, arrays: Arrays, scale: float, suffix: str = "") -> str:
    path = publish_adapter(Path(cfg.publish), cfg.adapter_name + suffix, arrays, scale, cfg.tenant)
    log.info("published %s", path)
    return str(path)


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """The ServerApp; ``overrides`` take precedence over the run config (for in-process runs,
    whose run config is empty)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = FedConfig.from_run_config({**context.run_config, **(overrides or {})})
        run_federation(grid, cfg)

    return server


app = make_server_app()
