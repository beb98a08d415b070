"""The Flower ServerApp: run the rounds, measure the adapters, publish them to the cloud.

Settings come from the run config (``[tool.flwr.app.config]`` in ``pyproject.toml``, or
``flwr run . --run-config 'key=value ...'``); see ``federated.config``. With ``out`` set, the
run's summary is written to ``OUT/result.json``; with ``publish`` set to a bundle directory in a
cloud model repository, the global adapter (and with ``publish-personal`` each client's) is
written there as a new adapter version, which a running service picks up without a restart;
an adapter's head part (``head-targets``) goes beside it, for edge devices to load.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from tandem.federated.config import FedConfig
from tandem.federated.lora import (
    Arrays,
    attach,
    lora_arrays,
    merge_into,
    pairs,
    resolve_head_targets,
    resolve_targets,
    split_head,
)
from tandem.federated.publish import publish_adapter
from tandem.federated.rounds import Evaluate, RoundLog, personalise, run_rounds
from tandem.federated.strategies import build_strategy
from tandem.federated.task import (
    Features,
    Wire,
    accuracy,
    domain_inputs,
    features,
    head_model,
    head_runner,
    model_for,
    resolved,
    tail_model,
)

log = logging.getLogger(__name__)


def initial_adapter(cfg: FedConfig) -> Arrays:
    """A fresh adapter at the largest rank: A random (seeded), B zero, so it changes nothing.

    It covers ``targets`` of the decoder + tail and ``head-targets`` of the head."""
    head = resolve_head_targets(head_model(cfg.bundle), cfg.head_targets)
    model = model_for(_wire(cfg), bool(head))
    tail = resolve_targets(model, cfg.targets)
    return lora_arrays(attach(model, tail + head, cfg.max_rank, cfg.alpha, seed=cfg.seed))


def _wire(cfg: FedConfig) -> Wire:
    return Wire(cfg.bundle, cfg.width, cfg.bits, cfg.point)


@dataclass(frozen=True)
class ShiftedTest:
    """The test slice seen through each client's domain, all of them together: the images
    and labels, and the frozen head's wire features of them."""

    x: np.ndarray
    y: np.ndarray
    features: Features


def shifted_test(cfg: FedConfig, clients: int) -> ShiftedTest:
    """The server's test data: every client's domain applied to the test slice."""
    domains = cfg.domain_list()
    parts = [
        domain_inputs(cfg.data, domains[p % len(domains)], cfg.eval_samples, cfg.seed * 1000 + p)
        for p in range(clients)
    ]
    x, y = np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
    return ShiftedTest(x, y, features(_wire(cfg), x, y))


def evaluator(cfg: FedConfig, test: ShiftedTest) -> Evaluate:
    """(adapter, scale) -> accuracy of the bundle with that adapter merged, on ``test``.

    An adapter with head keys is measured as a device and the cloud would run it: the images
    go through the merged head and the real codec, and the features through the merged tail.
    """

    def evaluate(arrays: Arrays, scale: float) -> float:
        head, tail = split_head(arrays)
        data = test.features
        if head:
            encoder = head_model(cfg.bundle)
            merge_into(encoder, head, scale)
            data = features(_wire(cfg), test.x, test.y, head_runner(cfg.bundle, encoder))
        model = tail_model(cfg.bundle)
        if tail:
            merge_into(model, tail, scale)
        return accuracy(model, data)

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
            published.extend(_publish(cfg, strategy.global_adapter(arrays), strategy.scale))

    frozen = evaluate({}, 1.0)
    arrays, logs = run_rounds(grid, cfg, strategy, strategy.first_arrays(initial), evaluate,
                              on_round)  # fmt: skip
    final = strategy.global_adapter(arrays)
    summary: dict[str, Any] = {
        "strategy": cfg.strategy, "rounds": [r.as_dict() for r in logs],
        "frozen_accuracy": frozen, "global_accuracy": evaluate(final, strategy.scale),
        "tail_fp32_bytes": tail_bytes(cfg.bundle), "scale": strategy.scale,
        "targets": sorted(pairs(initial)),
    }  # fmt: skip
    if cfg.personal_epochs:
        personal, plog = personalise(grid, cfg, strategy, arrays)
        summary["personal"] = plog.as_dict()
        if cfg.publish and cfg.publish_personal:
            for p, adapter in sorted(personal.items()):
                published.extend(_publish(cfg, adapter, strategy.scale, f"-client{p}"))
    just_published = cfg.publish_every and cfg.num_rounds % cfg.publish_every == 0
    if cfg.publish and not just_published:
        published.extend(_publish(cfg, final, strategy.scale))
    summary["published"] = published
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def tail_bytes(bundle: str) -> int:
    """The bundle's decoder + tail weights in float32, in bytes."""
    return sum(p.numel() * 4 for p in tail_model(bundle).parameters())


def _publish(cfg: FedConfig, arrays: Arrays, scale: float, suffix: str = "") -> list[str]:
    if not arrays:  # every round so far skipped, under a strategy that starts from nothing
        log.warning("nothing to publish yet for %s", cfg.adapter_name + suffix)
        return []
    width, bits = resolved(_wire(cfg))
    paths = publish_adapter(Path(cfg.publish), cfg.adapter_name + suffix, arrays, scale,
                            cfg.tenant, width=width, bits=bits)  # fmt: skip
    for path in paths:
        log.info("published %s", path)
    return [str(p) for p in paths]


def log_to_stderr() -> None:
    """Send this package's federation log (INFO and up) to stderr, which Flower streams to
    ``flwr run --stream``, in Flower's ``LEVEL : message`` form; once per process, and not
    also to the root logger, which would print each line a second time."""
    logger = logging.getLogger("tandem.federated")
    if any(getattr(h, "tandem_stderr", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s : %(message)s"))
    handler.tandem_stderr = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """The ServerApp; ``overrides`` take precedence over the run config (for in-process runs,
    whose run config is empty)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        log_to_stderr()
        cfg = FedConfig.from_run_config({**context.run_config, **(overrides or {})})
        run_federation(grid, cfg)

    return server


app = make_server_app()
