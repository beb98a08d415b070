"""The federation's round loop: train, aggregate, evaluate, publish, and keep count.

Flower's ``Strategy.start`` runs rounds too; this loop adds what a fleet of devices needs:

- a round waits at most ``round-timeout`` seconds, and goes ahead with the replies it has;
- with fewer than ``min-replies`` good replies the round is skipped: the global adapter stays;
- failures are counted per round: error replies, replies that do not decode, and nodes that
  never answered;
- the adapter goes down and every reply comes back as ``tandem.codec`` bytes
  (``federated.updates``), and the bytes each client received and sent are logged;
- after the last round, an optional personalisation round fine-tunes the global adapter on
  each client's own data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from tandem.federated.config import FedConfig
from tandem.federated.lora import Arrays
from tandem.federated.strategies import LoraStrategy
from tandem.federated.updates import (
    METRICS_KEY,
    UpdateError,
    compress_down,
    decode_reply,
    down_bytes,
    number,
)

log = logging.getLogger(__name__)


@dataclass
class ClientRound:
    """One client's part in one round."""

    partition: int
    bytes_up: int
    bytes_down: int
    examples: int
    train_loss: float
    acc_before: float
    acc_after: float
    rank: int


@dataclass
class RoundLog:
    """What one round did."""

    round: int
    sampled: int
    replies: int
    failures: int
    missing: int
    skipped: bool
    seconds: float
    accuracy: float | None = None
    clients: list[ClientRound] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def bytes_per_client(self) -> tuple[int, int]:
        """Mean encoded bytes (down, up) per replying client; (0, 0) with no replies."""
        if not self.clients:
            return 0, 0
        n = len(self.clients)
        return (
            round(sum(c.bytes_down for c in self.clients) / n),
            round(sum(c.bytes_up for c in self.clients) / n),
        )


@dataclass
class Outcome:
    """A round's decoded good replies, with its log."""

    replies: list[Message]
    log: RoundLog


def _client(reply: Message, down: int) -> ClientRound:
    m = reply.content.metric_records[METRICS_KEY]
    return ClientRound(
        partition=int(number(m, "partition")), bytes_up=int(number(m, "bytes-up")),
        bytes_down=down, examples=int(number(m, "num-examples")),
        train_loss=number(m, "train-loss"), acc_before=number(m, "acc-before"),
        acc_after=number(m, "acc-after"), rank=int(number(m, "rank")),
    )  # fmt: skip


def exchange(grid: Grid, messages: list[Message], cfg: FedConfig, server_round: int) -> Outcome:
    """Send one round's train messages; decode, check and count what comes back in time."""
    start = time.monotonic()
    # What each client will decode is what it trains from, so it is what the server sent.
    sent = compress_down(messages, cfg.update_bits, cfg.update_zstd)
    down = {m.metadata.dst_node_id: down_bytes(m) for m in messages}
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    good, errors, clients = [], [], []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            errors.append(f"node {node}: {reply.error.reason}")
            continue
        try:
            decoded = decode_reply(reply, sent[node])
            clients.append(_client(decoded, down[node]))
        except (UpdateError, KeyError, ValueError) as exc:
            errors.append(f"node {node}: bad reply: {exc}")
            continue
        good.append(decoded)
    missing = len(messages) - len(replies)
    skipped = len(good) < cfg.min_replies
    record = RoundLog(
        round=server_round, sampled=len(messages), replies=len(good), failures=len(errors),
        missing=missing, skipped=skipped, seconds=time.monotonic() - start,
        clients=sorted(clients, key=lambda c: c.partition), errors=errors,
    )  # fmt: skip
    for e in errors:
        log.warning("round %d: %s", server_round, e)
    if missing:
        log.warning("round %d: %d of %d nodes did not answer in %.0f s", server_round,
                    missing, len(messages), cfg.round_timeout)  # fmt: skip
    return Outcome(good, record)


Evaluate = Callable[[Arrays, float], float]  # (global adapter, its scale) -> accuracy
OnRound = Callable[[int, ArrayRecord, RoundLog], None]


def run_rounds(
    grid: Grid,
    cfg: FedConfig,
    strategy: LoraStrategy,
    arrays: ArrayRecord,
    evaluate: Evaluate,
    on_round: OnRound,
) -> tuple[ArrayRecord, list[RoundLog]]:
    """``cfg.num_rounds`` rounds from ``arrays``; the final arrays and every round's log."""
    logs = []
    for rnd in range(1, cfg.num_rounds + 1):
        config = ConfigRecord({**cfg.client_config(), "server-round": rnd})
        messages = list(strategy.configure_train(rnd, arrays, config, grid))
        outcome = exchange(grid, messages, cfg, rnd)
        if not outcome.log.skipped:
            new, _ = strategy.aggregate(rnd, arrays, outcome.replies)
            arrays = arrays if new is None else new
        else:
            log.warning("round %d skipped: %d good replies, %d needed", rnd,
                        outcome.log.replies, cfg.min_replies)  # fmt: skip
        outcome.log.accuracy = evaluate(strategy.global_adapter(arrays), strategy.scale)
        down, up = outcome.log.bytes_per_client()
        log.info(
            "round %d: %d replies, %d failures, %d missing, accuracy %.4f, "
            "%d bytes down and %d up per client", rnd, outcome.log.replies,
            outcome.log.failures, outcome.log.missing, outcome.log.accuracy, down, up,
        )  # fmt: skip
        logs.append(outcome.log)
        on_round(rnd, arrays, outcome.log)
    return arrays, logs


def personalise(
    grid: Grid, cfg: FedConfig, strategy: LoraStrategy, arrays: ArrayRecord
) -> tuple[dict[int, Arrays], RoundLog]:
    """One more local training on every client, from the global adapter, kept apart:
    each client's personal adapter (by partition) and the round's log."""
    rnd = cfg.num_rounds + 1
    config = ConfigRecord(
        {**cfg.client_config(), "server-round": rnd, "local-epochs": cfg.personal_epochs}
    )
    outcome = exchange(grid, list(strategy.configure_train(rnd, arrays, config, grid)), cfg, rnd)
    personal = {
        int(number(r.content.metric_records[METRICS_KEY], "partition")): strategy.personal_adapter(
            arrays, r
        )
        for r in outcome.replies
    }
    return personal, outcome.log
