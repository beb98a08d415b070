"""Federated building blocks: config, domains, partitions, update codec, rank algebra, LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tandem.adapters import (
    AdapterError,
    list_adapters,
    load_adapter,
    merged_state,
    read_metadata,
)
from tandem.bundle import HeadRunner
from tandem.federated.client_app import client_rank
from tandem.federated.config import FedConfig, FedConfigError
from tandem.federated.domains import DomainError, apply_domain
from tandem.federated.lora import (
    LoraError,
    attach,
    load_arrays,
    lora_arrays,
    merge_into,
    resolve_head_targets,
    resolve_targets,
    split_head,
)
from tandem.federated.partition import partition_rows
from tandem.federated.publish import next_version, publish_adapter
from tandem.federated.rank import compact, concat_ranks, pad_rank, scale_b, truncate_rank
from tandem.federated.task import (
    Wire,
    accuracy,
    domain_inputs,
    features,
    head_model,
    model_for,
    normalized,
    predictions,
    tail_model,
)
from tandem.federated.updates import UpdateError, decode_update, encode_update


def _delta(arrays: dict[str, np.ndarray], module: str) -> np.ndarray:
    a, b = arrays[f"{module}.lora_A"], arrays[f"{module}.lora_B"]
    return b.reshape(b.shape[0], -1).astype(np.float64) @ a.reshape(a.shape[0], -1)


def _random_adapter(rank: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "m.conv.lora_A": rng.normal(size=(rank, 6, 3, 3)).astype(np.float32),
        "m.conv.lora_B": rng.normal(size=(5, rank, 1, 1)).astype(np.float32),
        "fc.lora_A": rng.normal(size=(rank, 7)).astype(np.float32),
        "fc.lora_B": rng.normal(size=(3, rank)).astype(np.float32),
    }


# ------------------------------------------------------------------------------- config


def test_config_reads_flower_dashed_keys() -> None:
    cfg = FedConfig.from_run_config({"bundle": "b", "num-rounds": 3, "update-bits": 4})
    assert (cfg.num_rounds, cfg.update_bits) == (3, 4)
    assert cfg.client_config()["update-bits"] == 4


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({}, "bundle"),
        ({"bundle": ""}, "bundle"),
        ({"bundle": "b", "update-bits": 3}, "update-bits"),
        ({"bundle": "b", "strategy": "fedsgd"}, "strategy"),
        ({"bundle": "b", "ranks": "2,x"}, "ranks"),
        ({"bundle": "b", "ranks": "2,4"}, "hetlora"),
        ({"bundle": "b", "dp": "server-fixed", "strategy": "ffa"}, "fedit"),
        ({"bundle": "b", "min-replies": 5, "min-nodes": 2}, "min-replies"),
        ({"bundle": "b", "surprise": 1}, "surprise"),
    ],
)
def test_config_errors_name_the_key(config: dict[str, object], words: str) -> None:
    with pytest.raises(FedConfigError, match=words):
        FedConfig.from_run_config(config)


def test_ranks_cycle_over_clients_and_never_exceed_what_was_sent() -> None:
    from flwr.app import ConfigRecord, Context, RecordDict

    cfg = FedConfig.from_run_config({"bundle": "b", "strategy": "hetlora", "ranks": "2,8"})
    assert cfg.max_rank == 8
    config = ConfigRecord(cfg.client_config())

    def rank(partition: int, offered: int) -> int:
        node = {"partition-id": partition, "num-partitions": 3}
        context = Context(run_id=1, node_id=partition, node_config=node, state=RecordDict(),
                          run_config={})  # fmt: skip
        return client_rank(config, context, offered)

    assert [rank(p, 8) for p in range(3)] == [2, 8, 2]
    assert rank(1, 4) == 4


# ------------------------------------------------------------------------------- domains


def test_domains_keep_shape_and_differ() -> None:
    x = np.random.default_rng(0).integers(0, 256, (5, 1, 12, 12)).astype(np.uint8)
    seen = set()
    for spec in ("identity", "rotate:35", "invert", "noise:0.3", "contrast:0.3", "shift:0.2",
                 "blur:3"):  # fmt: skip
        y = apply_domain(spec, x, seed=1)
        assert y.shape == x.shape and y.dtype == np.uint8
        np.testing.assert_array_equal(y, apply_domain(spec, x, seed=1))  # deterministic
        seen.add(y.tobytes())
    assert len(seen) == 7
    np.testing.assert_array_equal(apply_domain("invert", x), 255 - x)


@pytest.mark.parametrize("spec", ["sepia", "rotate:abc", "noise:2", "blur:1.5", "shift:1"])
def test_bad_domains_raise(spec: str) -> None:
    with pytest.raises(DomainError):
        apply_domain(spec, np.zeros((1, 1, 4, 4), np.uint8))


# ------------------------------------------------------------------------------- partitions


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover(scheme: str) -> None:
    labels = np.random.default_rng(0).integers(0, 10, 2000)
    parts = [partition_rows(labels, 5, p, scheme=scheme, alpha=0.3) for p in range(5)]  # type: ignore[arg-type]
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == 2000
    again = partition_rows(labels, 5, 2, scheme=scheme, alpha=0.3)  # type: ignore[arg-type]
    np.testing.assert_array_equal(parts[2], again)


def test_dirichlet_skews_labels_more_than_iid() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 4000)

    def spread(scheme: str) -> float:
        mixes = [np.bincount(labels[partition_rows(labels, 8, p, scheme=scheme, alpha=0.2)],  # type: ignore[arg-type]
                             minlength=10) for p in range(8)]  # fmt: skip
        return float(np.mean([np.std(m / m.sum()) for m in mixes]))

    assert spread("dirichlet") > 3 * spread("iid")


# ------------------------------------------------------------------------------- updates


@pytest.mark.parametrize(("bits", "tolerance"), [(4, 0.08), (8, 0.005), (16, 1e-3)])
def test_update_round_trip(bits: int, tolerance: float) -> None:
    for key, value in _random_adapter(4).items():
        back = decode_update(key, encode_update(key, value, bits), value)
        assert back.shape == value.shape
        scale = np.abs(value).max()
        assert np.abs(back - value).max() <= tolerance * scale


def test_lower_rank_update_decodes_against_the_first_components() -> None:
    full = _random_adapter(8)
    for key, value in truncate_rank(full, 3).items():
        back = decode_update(key, encode_update(key, value, 16), full[key])
        assert back.shape == value.shape


def test_updates_that_do_not_fit_are_refused() -> None:
    a = _random_adapter(4)["fc.lora_A"]
    with pytest.raises(UpdateError):
        decode_update("fc.lora_A", encode_update("fc.lora_A", np.zeros((4, 9), np.float32), 8), a)
    with pytest.raises(UpdateError):
        decode_update("fc.lora_A", b"\x00garbage", a)
    bigger = np.zeros((6, 7), np.float32)
    with pytest.raises(UpdateError):
        decode_update("fc.lora_A", encode_update("fc.lora_A", bigger, 8), a)


# ------------------------------------------------------------------------------- rank algebra


def test_truncate_then_pad_keeps_the_first_components() -> None:
    full = _random_adapter(6)
    padded = pad_rank(truncate_rank(full, 2), 6)
    assert padded["fc.lora_A"].shape == (6, 7) and padded["fc.lora_B"].shape == (3, 6)
    np.testing.assert_array_equal(padded["fc.lora_A"][:2], full["fc.lora_A"][:2])
    assert not padded["fc.lora_A"][2:].any() and not padded["fc.lora_B"][:, 2:].any()


def test_stacking_sums_the_deltas_and_compact_keeps_them() -> None:
    one, two = scale_b(_random_adapter(2, 1), 0.25), scale_b(_random_adapter(3, 2), 0.75)
    stacked = concat_ranks([one, two])
    for module in ("fc", "m.conv"):
        want = _delta(one, module) + _delta(two, module)
        np.testing.assert_allclose(_delta(stacked, module), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_delta(compact(stacked), module), want, rtol=1e-4, atol=1e-4)
    # fc's delta is 3 x 7: rank 3 at most, whatever was stacked
    assert compact(stacked)["fc.lora_A"].shape[0] == 5  # padded to the conv's rank 5


# ------------------------------------------------------------------------------- LoRA on a bundle


def test_auto_targets_are_the_last_stage_and_classifier(digits_bundle: Path) -> None:
    targets = resolve_targets(tail_model(str(digits_bundle)), "auto")
    assert "tail.fc" in targets and all(
        t == "tail.fc" or t.startswith("tail.layer4.") for t in targets
    )
    assert resolve_targets(tail_model(str(digits_bundle)), "fc") == ["tail.fc"]
    with pytest.raises(LoraError, match="nothing"):
        resolve_targets(tail_model(str(digits_bundle)), "nothing")
    assert resolve_targets(tail_model(str(digits_bundle)), "decoder.out,fc") == [
        "decoder.out", "tail.fc",
    ]  # fmt: skip
    with pytest.raises(LoraError, match="slices"):
        resolve_targets(tail_model(str(digits_bundle)), "expand")


def test_merged_adapter_computes_what_peft_and_the_cloud_compute(
    digits_bundle: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    bundle = str(digits_bundle)
    targets = resolve_targets(tail_model(bundle), "auto")
    peft = attach(tail_model(bundle), targets, 4, 8.0, seed=3)
    arrays = {k: v + 0.05 for k, v in lora_arrays(peft).items()}  # B nonzero: a real delta
    load_arrays(peft, arrays)
    z = torch.randn(6, 8, 4, 4)
    with torch.inference_mode():
        want = peft(z)
        merged = tail_model(bundle)
        merge_into(merged, arrays, 2.0)
        torch.testing.assert_close(merged(z), want, rtol=1e-4, atol=1e-4)

    # Published, the adapter is PEFT's format: PEFT and the cloud both load it.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({}))
    (path,) = publish_adapter(tmp_path / "b", "fed", arrays, 2.0, width=1.0, bits=8)
    assert path == tmp_path / "b" / "adapters" / "fed" / "1"
    assert next_version(tmp_path / "b", "fed") == "2"
    with torch.inference_mode():
        loaded = PeftModel.from_pretrained(tail_model(bundle), str(path))
        torch.testing.assert_close(loaded(z), want, rtol=1e-4, atol=1e-4)
        base = tail_model(bundle)
        state = merged_state(base, load_adapter(path, "fed", "1"))
        cloud = torch.func.functional_call(base, state, (z,), strict=False)
        torch.testing.assert_close(cloud, want, rtol=1e-4, atol=1e-4)


def test_head_targets_are_the_encoder_body_never_its_projection(digits_bundle: Path) -> None:
    head = head_model(str(digits_bundle))
    body = [f"head.body.{n}" for n, m in head.body.named_modules() if isinstance(m, nn.Conv2d)]
    assert resolve_head_targets(head, "auto") == sorted(body) and len(body) >= 2
    assert resolve_head_targets(head, "") == []
    assert resolve_head_targets(head, "body.0.0") == ["head.body.0.0"]
    with pytest.raises(LoraError, match="slices"):
        resolve_head_targets(head, "project")
    with pytest.raises(LoraError, match="no Linear or Conv2d of the head"):
        resolve_head_targets(head, "fc")
    assert resolve_targets(tail_model(str(digits_bundle)), "none") == []
    with pytest.raises(FedConfigError, match="head-targets"):
        FedConfig.from_run_config({"bundle": "b", "targets": "none"})


def test_end_to_end_model_predicts_what_the_wire_predicts_and_trains_the_head(
    digits_bundle: Path,
) -> None:
    wire = Wire(str(digits_bundle))
    x, y = domain_inputs("digits", "rotate:20", 300, 0)
    model = model_for(wire, head=True)
    images, wired = normalized(wire, x, y), features(wire, x, y)
    # The codec's rounding, copied in torch, may land a value one level off now and then.
    same = predictions(model, images) == predictions(tail_model(wire.bundle), wired)
    assert float(same.float().mean()) >= 0.98
    assert accuracy(model, images) == pytest.approx(
        accuracy(tail_model(wire.bundle), wired), abs=0.02
    )

    peft = attach(model, ["head.body.0.0", "tail.fc"], 2, 4.0)
    load_arrays(peft, {k: v + 0.1 for k, v in lora_arrays(peft).items()})
    peft.eval()
    torch.nn.functional.cross_entropy(peft(images.z[:32]), images.y[:32]).backward()
    grads = {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}
    head_b = "base_model.model.head.body.0.0.lora_B.default.weight"
    assert grads[head_b] is not None and float(grads[head_b].abs().sum()) > 0


def test_a_head_adapter_is_published_apart_and_the_edge_merges_it_as_trained(
    digits_bundle: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    bundle = str(digits_bundle)
    peft = attach(
        model_for(Wire(bundle), head=True), ["head.body.0.0", "head.body.1.0", "tail.fc"], 2, 4.0
    )
    arrays = {k: v + 0.05 for k, v in lora_arrays(peft).items()}
    head, tail = split_head(arrays)
    assert sorted(head) == [
        "body.0.0.lora_A",
        "body.0.0.lora_B",
        "body.1.0.lora_A",
        "body.1.0.lora_B",
    ]
    assert sorted(tail) == ["tail.fc.lora_A", "tail.fc.lora_B"]

    repo_bundle = tmp_path / "b"
    repo_bundle.mkdir()
    (repo_bundle / "manifest.json").write_text(json.dumps({}))
    head_path, tail_path = publish_adapter(repo_bundle, "fed", arrays, 2.0, width=0.5, bits=4)
    assert head_path == repo_bundle / "head-adapters" / "fed" / "1"
    assert tail_path == repo_bundle / "adapters" / "fed" / "1"
    assert read_metadata(head_path) == {
        "tenant": "", "tail_adapter": {"name": "fed", "version": "1"}, "width": 0.5, "bits": 4,
    }  # fmt: skip
    assert next_version(repo_bundle, "fed") == "2"
    assert [v for _, v, _ in list_adapters(repo_bundle)] == ["1"]  # the cloud sees the tail only
    # Head only: one part, at the next version, paired with the bundle's own tail.
    (only,) = publish_adapter(repo_bundle, "fed", {f"head.{k}": v for k, v in head.items()}, 2.0,
                              width=0.5, bits=4)  # fmt: skip
    assert only == repo_bundle / "head-adapters" / "fed" / "2"
    assert read_metadata(only)["tail_adapter"] is None
    assert next_version(repo_bundle, "fed") == "3"
    with pytest.raises(ValueError, match="no LoRA weights"):
        publish_adapter(repo_bundle, "fed", {}, 2.0, width=0.5, bits=4)

    expected = head_model(bundle)
    merge_into(expected, head, 2.0)
    edge = HeadRunner.from_bundle(digits_bundle, head_path).encoder
    for (name, got), want in zip(
        edge.state_dict().items(), expected.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name
    x = torch.randn(4, 1, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(
            PeftModel.from_pretrained(head_model(bundle), str(head_path))(x), expected(x),
            rtol=1e-4, atol=1e-4,
        )  # fmt: skip
    with pytest.raises(AdapterError, match=r"does not fit this bundle's head.*no module"):
        HeadRunner.from_bundle(digits_bundle, tail_path)


def test_load_arrays_refuses_what_does_not_fit(digits_bundle: Path) -> None:
    bundle = str(digits_bundle)
    peft = attach(tail_model(bundle), ["tail.fc"], 2, 4.0)
    with pytest.raises(LoraError, match="no LoRA weight"):
        load_arrays(peft, {"tail.nope.lora_A": np.zeros((2, 3), np.float32)})
    with pytest.raises(LoraError, match="does not fit"):
        load_arrays(peft, {"tail.fc.lora_A": np.zeros((3, 3), np.float32)})


def test_pyproject_declares_every_setting_with_its_default() -> None:
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    expected = FedConfig.model_fields
    assert set(declared) == {name.replace("_", "-") for name in expected}
    for name, field in expected.items():
        if name != "bundle":
            assert declared[name.replace("_", "-")] == field.default, name


def test_the_adapter_sent_down_is_compressed_and_the_client_decodes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.app import MessageType as Kind
    from flwr.supercore.task_identity import TaskIdentity

    # Messages are made inside a run; this test plays one.
    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)

    from tandem.federated.updates import compress_down, decode_down, down_bytes, to_record

    adapter = _random_adapter(4, seed=3)
    shared = to_record(adapter)
    messages = [
        Message(
            RecordDict(
                {
                    "arrays": shared,
                    "frozen": to_record(adapter),
                    "config": ConfigRecord({"update-bits": 8}),
                }
            ),
            dst_node_id=node,
            message_type=Kind.TRAIN,
        )
        for node in (11, 12)
    ]
    held = compress_down(messages, bits=8, compress=True)
    fp32 = sum(v.nbytes for v in adapter.values())
    for m in messages:
        # The adapter to train leaves as codec bytes; the frozen record, which no reply can
        # correct, stays float32.
        assert list(m.content.array_records) == ["frozen"]
        # Counted: the adapter's codec bytes, and the frozen record's float32 bytes.
        assert fp32 < down_bytes(m) < 1.35 * fp32
        seen: dict[str, dict[str, np.ndarray]] = {}

        def call_next(
            msg: Message, context: Context, seen: dict[str, dict[str, np.ndarray]] = seen
        ) -> Message:
            for key in ("arrays", "frozen"):
                record = msg.content.array_records[key]
                assert isinstance(record, ArrayRecord)
                seen[key] = {k: record[k].numpy() for k in record}
            return msg

        decode_down(m, Context(0, 0, {}, RecordDict(), {}), call_next)
        # The client starts from exactly what the server holds it started from...
        for k, v in held[m.metadata.dst_node_id].items():
            np.testing.assert_array_equal(seen["arrays"][k], v)
        # ...which is the adapter up to the codec's rounding (half a step at 8 bits)...
        for k, v in adapter.items():
            np.testing.assert_allclose(seen["arrays"][k], v, atol=np.ptp(v) / 255)
            # ...while the frozen record arrives exactly.
            np.testing.assert_array_equal(seen["frozen"][k], v)
