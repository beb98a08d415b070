"""The Flower ClientApp: a device fine-tunes the bundle's LoRA adapter on its own data.

Every setting arrives in the message's config (the server validated it); the node itself
contributes only its ``partition-id`` and ``num-partitions`` (node config), which pick its rows
and its domain, and optionally its ``device`` (``auto``, the default: CUDA when PyTorch sees
one; ``cpu``; ``cuda[:N]``), where it trains and evaluates. What the server sends arrives
codec-encoded and is decoded first (:func:`federated.updates.decode_down`); replies leave
through :func:`federated.updates.compress_updates`.

Message contents, by key: ``arrays`` the adapter weights to start from and train (their keys
are what comes back), ``frozen`` weights to load but keep fixed (FFA-LoRA's A), ``base`` an
adapter to merge into the base weights first (FLoRA's accumulated one), ``config`` settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast, get_args

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from peft import PeftModel

from tandem.device import resolve_device
from tandem.federated.config import rank_list
from tandem.federated.domains import domain_list
from tandem.federated.lora import (
    Arrays,
    attach,
    has_head,
    load_arrays,
    lora_arrays,
    merge_into,
    rank_of,
)
from tandem.federated.partition import Scheme
from tandem.federated.rank import truncate_rank
from tandem.federated.strategies import BASE_KEY, FROZEN_KEY
from tandem.federated.task import (
    ClientSpec,
    Features,
    TrainSettings,
    Wire,
    accuracy,
    client_inputs,
    model_for,
    train,
)
from tandem.federated.updates import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    compress_updates,
    decode_down,
    from_record,
    number,
    to_record,
)

CLIPPING_KEY = "clipping_norm"  # what Flower's client-side DP strategy puts in the config


def _partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    try:
        return int(node["partition-id"]), int(node["num-partitions"])
    except (KeyError, ValueError):
        raise ValueError(
            "this SuperNode has no partition: start it with "
            "--node-config 'partition-id=N num-partitions=M'"
        ) from None


def node_device(context: Context) -> torch.device:
    """Where this node computes: its node config's ``device`` (default ``auto``)."""
    return resolve_device(str(context.node_config.get("device", "auto")))


def _get(config: ConfigRecord, key: str) -> str:
    if key not in config:
        raise ValueError(f"the server's config lacks {key!r}")
    return str(config[key])


def client_data(
    config: ConfigRecord, context: Context, images: bool = False
) -> tuple[Features, Features]:
    """This node's (train, test) model inputs, as ``config`` and its partition say: wire
    features, or with ``images`` normalised images (for a model that adapts the head)."""
    partition, count = _partition(context)
    domains = domain_list(_get(config, "domains"))
    scheme = _get(config, "partitioner")
    if scheme not in get_args(Scheme):
        raise ValueError(f"unknown partitioner {scheme!r}")
    spec = ClientSpec(
        data=_get(config, "data"), partition=partition, num_partitions=count,
        domain=domains[partition % len(domains)], scheme=cast(Scheme, scheme),
        dirichlet_alpha=float(_get(config, "dirichlet-alpha")),
        max_samples=int(_get(config, "max-samples")),
        eval_samples=int(_get(config, "eval-samples")), seed=int(_get(config, "seed")),
    )  # fmt: skip
    return client_inputs(_wire(config), spec, images)


def _wire(config: ConfigRecord) -> Wire:
    return Wire(
        _get(config, "bundle"), float(_get(config, "width")), int(_get(config, "bits")),
        int(_get(config, "point")),
    )  # fmt: skip


def client_rank(config: ConfigRecord, context: Context, offered: int) -> int:
    """This client's rank: its entry of ``ranks`` when set (capped at ``offered``)."""
    ranks = rank_list(str(config.get("ranks", "")))
    if not ranks:
        return offered
    return min(offered, ranks[_partition(context)[0] % len(ranks)])


def build_model(msg: Message, context: Context) -> tuple[PeftModel, set[str]]:
    """The model with this message's adapter attached, and the keys it trains: decoder +
    tail, or the whole :class:`~federated.task.EndToEnd` when the adapter has head keys."""
    config = msg.content.config_records[CONFIG_KEY]
    trained = from_record(msg.content.array_records[ARRAYS_KEY])
    frozen: Arrays = (
        from_record(msg.content.array_records[FROZEN_KEY])
        if FROZEN_KEY in msg.content.array_records
        else {}
    )
    start = {**frozen, **trained}
    model = model_for(_wire(config), has_head(start))
    if BASE_KEY in msg.content.array_records and len(msg.content.array_records[BASE_KEY]):
        merge_into(model, from_record(msg.content.array_records[BASE_KEY]), 1.0)
    rank = client_rank(config, context, rank_of(start))
    start = truncate_rank(start, rank)
    targets = sorted({k.rsplit(".", 1)[0] for k in start})
    scale = float(_get(config, "lora-scale"))
    peft = attach(model, targets, rank, scale * rank, seed=int(_get(config, "seed")))
    load_arrays(peft, start)
    trainable = {f"base_model.model.{k}.default.weight" for k in trained}
    for name, param in peft.named_parameters():
        param.requires_grad_(name in trainable)
    return peft, set(trained)


def _train(msg: Message, context: Context) -> Message:
    config = msg.content.config_records[CONFIG_KEY]
    device = node_device(context)
    model, keys = build_model(msg, context)
    model.to(device)
    train_data, test_data = client_data(config, context, has_head(keys))
    before = accuracy(model, test_data, device)
    settings = TrainSettings(
        epochs=int(_get(config, "local-epochs")), lr=float(_get(config, "lr")),
        batch_size=int(_get(config, "batch-size")),
        proximal_mu=float(_get(config, "proximal-mu")),
        seed=int(_get(config, "seed")) + int(number(config, "server-round")),
    )  # fmt: skip
    loss = train(model, train_data, settings, device)
    trained = lora_arrays(model)
    arrays = {k: v for k, v in trained.items() if k in keys}
    metrics = MetricRecord({
        "num-examples": len(train_data), "train-loss": loss, "partition": _partition(context)[0],
        "rank": rank_of(trained), "acc-before": before,
        "acc-after": accuracy(model, test_data, device),
    })  # fmt: skip
    return Message(RecordDict({ARRAYS_KEY: to_record(arrays), METRICS_KEY: metrics}), reply_to=msg)


def _evaluate(msg: Message, context: Context) -> Message:
    device = node_device(context)
    model, keys = build_model(msg, context)
    model.to(device)
    _, test_data = client_data(msg.content.config_records[CONFIG_KEY], context, has_head(keys))
    metrics = MetricRecord({
        "num-examples": len(test_data), "accuracy": accuracy(model, test_data, device),
        "partition": _partition(context)[0],
    })  # fmt: skip
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


def clip_if_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: Flower's fixed clipping, for runs whose server asks for client-side DP."""
    config = msg.content.config_records.get(CONFIG_KEY)
    if config is not None and CLIPPING_KEY in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def make_client_app(extra_mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp, with ``extra_mods`` innermost (tests inject faults there)."""
    client = ClientApp(mods=[decode_down, compress_updates, clip_if_asked, *extra_mods])
    client.train()(_train)
    client.evaluate()(_evaluate)
    return client


app = make_client_app()
