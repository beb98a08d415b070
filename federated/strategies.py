"""Aggregation strategies for LoRA adapters, as Flower strategies.

``build_strategy`` picks one from the run config:

- ``fedit``: FedAvg over A and B alike (FedIT). With ``server-momentum`` it is Flower's
  FedAvgM, with ``proximal-mu`` Flower's FedProx, and ``dp`` wraps it in one of Flower's
  differential-privacy strategies.
- ``ffa``: FFA-LoRA. A stays at its random initialisation and travels once per round in a
  separate record; only B is trained, sent back and averaged.
- ``hetlora``: clients train different ranks. Each truncates the global adapter to its rank
  (the first r rank components); the server zero-pads every reply to the largest rank and
  averages. A client's scale is ``alpha / max rank`` whatever its rank, so a truncated
  adapter is the global one with its tail components dropped.
- ``flora``: FLoRA stacking. Clients train a fresh adapter of their own rank on top of the
  base plus everything learnt so far; the server stacks the replies (A rows and B columns,
  each B weighted by its client's share of examples), which sums their deltas exactly, and
  adds the stack to the accumulated adapter. To keep its rank bounded the accumulated adapter
  is re-factored per module by SVD, exactly: only singular values below 1e-6 of the largest
  are dropped.

Every strategy sees decoded float replies (``federated.updates`` decodes them first) and
exposes ``scale``, the LoRA scale of the global adapter it returns, and ``client_adapter``,
the full adapter of one client's reply (for personal adapters).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedAvgM,
    FedProx,
    Strategy,
)

from tandem.federated.config import FedConfig
from tandem.federated.lora import Arrays
from tandem.federated.rank import compact, concat_ranks, pad_rank, scale_b
from tandem.federated.updates import ARRAYS_KEY, METRICS_KEY, from_record, number, to_record

FROZEN_KEY = "frozen"  # FFA-LoRA's A, sent alongside the trained arrays, never returned
BASE_KEY = "base"  # FLoRA's accumulated adapter, merged into the client's base weights


class LoraStrategy(Strategy):
    """A Flower strategy wrapping another (``inner``), with the LoRA-specific hooks."""

    def __init__(self, inner: Strategy, scale: float) -> None:
        self.inner, self.scale = inner, scale

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure a round as ``inner`` does, telling clients the LoRA scale."""
        config["lora-scale"] = self.scale
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate as ``inner`` does."""
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation, as ``inner`` configures it (the rounds here evaluate on the
        server instead; Flower's Strategy interface requires the method)."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Evaluation metrics, averaged as ``inner`` does."""
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log ``inner``'s summary."""
        self.inner.summary()

    def first_arrays(self, initial: Arrays) -> ArrayRecord:
        """The arrays the first round passes along, from a freshly initialised adapter."""
        return to_record(initial)

    def aggregate(
        self, server_round: int, current: ArrayRecord, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The next round's arrays from ``current`` and this round's replies."""
        return self.aggregate_train(server_round, replies)

    def global_adapter(self, arrays: ArrayRecord) -> Arrays:
        """The whole global adapter behind the arrays the rounds pass along."""
        return from_record(arrays)

    def client_adapter(self, reply: Message) -> Arrays:
        """One client's whole adapter from its (decoded) reply."""
        return from_record(reply.content.array_records[ARRAYS_KEY])

    def personal_adapter(self, current: ArrayRecord, reply: Message) -> Arrays:
        """One client's personal adapter, from a personalisation round's reply."""
        return self.client_adapter(reply)


class FfaLora(LoraStrategy):
    """FFA-LoRA: the rounds pass only B along; A is fixed and rides in its own record."""

    def __init__(self, inner: Strategy, scale: float, frozen_a: Arrays) -> None:
        super().__init__(inner, scale)
        self.frozen_a = frozen_a

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Each message also carries the frozen A."""
        return _with_record(super().configure_train(server_round, arrays, config, grid),
                            FROZEN_KEY, self.frozen_a)  # fmt: skip

    def first_arrays(self, initial: Arrays) -> ArrayRecord:
        """Only B travels; A is :attr:`frozen_a`."""
        return to_record({k: v for k, v in initial.items() if k.endswith(".lora_B")})

    def global_adapter(self, arrays: ArrayRecord) -> Arrays:
        """A and B together."""
        return {**self.frozen_a, **from_record(arrays)}

    def client_adapter(self, reply: Message) -> Arrays:
        """A and the client's B."""
        return {**self.frozen_a, **super().client_adapter(reply)}


class HetLora(LoraStrategy):
    """HetLoRA: replies of any rank up to the global one, zero-padded before averaging."""

    def __init__(self, inner: Strategy, scale: float, rank: int) -> None:
        super().__init__(inner, scale)
        self.rank = rank

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Pad every reply to the rank of the global adapter, then average."""
        padded = []
        for reply in replies:
            if not reply.has_error():
                arrays = pad_rank(from_record(reply.content.array_records[ARRAYS_KEY]), self.rank)
                reply.content.array_records[ARRAYS_KEY] = to_record(arrays)
            padded.append(reply)
        return self.inner.aggregate_train(server_round, padded)


class FLoRA(LoraStrategy):
    """FLoRA: each round's adapters are stacked onto the accumulated one (scale 1)."""

    def __init__(self, inner: FedAvg, fresh: Arrays, client_scale: float) -> None:
        super().__init__(inner, scale=1.0)
        self.fresh, self.client_scale = fresh, client_scale
        self.inner: FedAvg = inner

    def first_arrays(self, initial: Arrays) -> ArrayRecord:
        """Nothing accumulated yet (``initial`` is every round's fresh start)."""
        return ArrayRecord()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Clients get a fresh adapter to train and the accumulated one as their base."""
        config["lora-scale"] = self.client_scale
        messages = self.inner.configure_train(server_round, to_record(self.fresh), config, grid)
        return _with_record(messages, BASE_KEY, from_record(arrays))

    def aggregate(
        self, server_round: int, current: ArrayRecord, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The accumulated adapter plus every reply's delta, weighted by examples."""
        accumulated = from_record(current)
        good = [r for r in replies if not r.has_error()]
        if not good:
            return None, None
        weights = np.array(
            [number(r.content.metric_records[METRICS_KEY], "num-examples") for r in good]
        )
        weights /= weights.sum()
        parts = [accumulated] if accumulated else []
        parts += [
            scale_b(from_record(r.content.array_records[ARRAYS_KEY]), w * self.client_scale)
            for r, w in zip(good, weights, strict=True)
        ]
        metrics = self.inner.train_metrics_aggr_fn(
            [r.content for r in good], self.inner.weighted_by_key
        )
        return to_record(compact(concat_ranks(parts))), metrics

    def personal_adapter(self, current: ArrayRecord, reply: Message) -> Arrays:
        """The accumulated adapter with this client's own delta stacked on, at scale 1."""
        accumulated = from_record(current)
        own = scale_b(self.client_adapter(reply), self.client_scale)
        return compact(concat_ranks([accumulated, own] if accumulated else [own]))


def _with_record(messages: Iterable[Message], key: str, arrays: Arrays) -> list[Message]:
    """The messages, each with ``arrays`` added under ``key`` (one record object shared)."""
    record = to_record(arrays)
    out = []
    for m in messages:
        content = RecordDict(dict(m.content.items()))
        content[key] = record
        out.append(Message(content=content, message_type=m.metadata.message_type,
                           dst_node_id=m.metadata.dst_node_id))  # fmt: skip
    return out


def _base(cfg: FedConfig) -> FedAvg:
    n = cfg.min_nodes
    if cfg.server_momentum:
        return FedAvgM(
            fraction_train=cfg.fraction_train, min_train_nodes=n, min_available_nodes=n,
            server_learning_rate=cfg.server_lr, server_momentum=cfg.server_momentum,
        )  # fmt: skip
    if cfg.proximal_mu:
        return FedProx(
            fraction_train=cfg.fraction_train, min_train_nodes=n, min_available_nodes=n,
            proximal_mu=cfg.proximal_mu,
        )  # fmt: skip
    return FedAvg(fraction_train=cfg.fraction_train, min_train_nodes=n, min_available_nodes=n)


def _private(cfg: FedConfig, inner: FedAvg) -> Strategy:
    if cfg.dp == "server-fixed":
        return DifferentialPrivacyServerSideFixedClipping(
            inner, cfg.dp_noise, cfg.dp_clip, num_sampled_clients=cfg.min_nodes
        )
    if cfg.dp == "server-adaptive":
        return DifferentialPrivacyServerSideAdaptiveClipping(
            inner,
            cfg.dp_noise,
            num_sampled_clients=cfg.min_nodes,
            initial_clipping_norm=cfg.dp_clip,
        )
    if cfg.dp == "client-fixed":
        return DifferentialPrivacyClientSideFixedClipping(
            inner, cfg.dp_noise, cfg.dp_clip, num_sampled_clients=cfg.min_nodes
        )
    return inner


def build_strategy(cfg: FedConfig, initial: Arrays) -> LoraStrategy:
    """The strategy ``cfg`` names, around the right Flower base strategy.

    ``initial`` is the freshly initialised adapter at the largest rank: FFA-LoRA keeps its
    A for good, FLoRA hands it to clients as their fresh start every round.
    """
    scale = cfg.alpha / cfg.max_rank
    base = _base(cfg)
    if cfg.strategy == "flora":
        return FLoRA(base, initial, client_scale=scale)
    inner = _private(cfg, base)
    if cfg.strategy == "ffa":
        return FfaLora(inner, scale, {k: v for k, v in initial.items() if k.endswith(".lora_A")})
    if cfg.strategy == "hetlora":
        return HetLora(inner, scale, cfg.max_rank)
    return LoraStrategy(inner, scale)
