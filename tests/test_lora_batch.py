"""Many adapters in one batch: batched LoRA numerics, and mixed batches through the service."""

from __future__ import annotations

import asyncio
import copy
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from serving import config, make_repo, requests_for, running
from torch import nn
from torch.func import functional_call

import tandem.cloud.compute
import tandem.cloud.lora_pool
from tandem import codec
from tandem.adapters import Adapter, load_adapter, merged_state, save_adapter
from tandem.bundle import TailRunner, read_manifest
from tandem.cloud.inference import run_batch
from tandem.cloud.lora_batch import MixedLoRA
from tandem.cloud.repository import ModelEntry
from tandem.data import load_data
from tandem.edge.client import CloudClient
from tandem.protocol import from_message
from tandem.wire.v1 import split_inference_pb2 as pb

WIDTH, BITS = 0.5, 4
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


class Net(nn.Module):
    """A strided conv, a dilated conv without bias, a conv down to one output position
    (strided, padded and dilated), and a linear: the shapes LoRA meets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)  # 8x8 -> 4x4
        self.dilated = nn.Conv2d(6, 6, 3, padding=2, dilation=2, bias=False)  # 4x4
        self.collapse = nn.Conv2d(6, 6, 3, stride=2, padding=1, dilation=2)  # 4x4 -> 1x1
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.dilated(torch.relu(self.conv(x))))
        return self.head(torch.relu(self.collapse(h)).flatten(1))


def _pair(module: nn.Module, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (lora_A, lora_B) shaped as PEFT shapes them for ``module``; B non-zero."""
    if isinstance(module, nn.Linear):
        a = torch.randn(rank, module.in_features, generator=gen)
        return a, torch.randn(module.out_features, rank, generator=gen)
    assert isinstance(module, nn.Conv2d)
    a = torch.randn(rank, module.in_channels, *module.kernel_size, generator=gen)
    return a, torch.randn(module.out_channels, rank, 1, 1, generator=gen)


def _publish(
    model: nn.Module, path: Path, targets: list[str], rank: int, seed: int, **options: Any
) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    lora = {t: _pair(model.get_submodule(t), rank, gen) for t in targets}
    save_adapter(path, lora=lora, rank=rank, alpha=2.0, target_modules=targets, **options)
    return load_adapter(path, path.parent.name, path.name)


@torch.inference_mode()
def _row_by_row(model: nn.Module, x: torch.Tensor, adapters: list[Adapter | None]) -> torch.Tensor:
    """Each row alone, on the base model or with its adapter merged in."""
    rows = []
    for row, adapter in zip(x, adapters, strict=True):
        merged = {} if adapter is None else merged_state(model, adapter)
        rows.append(functional_call(model, merged, (row[None],), strict=False))
    return torch.cat(rows)


def test_mixed_batch_equals_each_row_on_its_merged_model(tmp_path: Path) -> None:
    net = Net().eval()
    every = ["conv", "dilated", "collapse", "head"]
    x_adapter = _publish(net, tmp_path / "x" / "1", every, 4, seed=1)
    # Another rank and other targets, rslora scaling.
    targets = ["dilated", "collapse"]
    y_adapter = _publish(net, tmp_path / "y" / "1", targets, 2, seed=2, use_rslora=True)
    mixed = MixedLoRA(copy.deepcopy(net), [(3, 8, 8)])
    assert mixed.adaptable == set(every)
    adapters = [x_adapter, y_adapter, None, y_adapter, x_adapter, None, x_adapter]
    x = torch.randn(len(adapters), 3, 8, 8)
    got = mixed(x, adapters)
    torch.testing.assert_close(got, _row_by_row(net, x, adapters), **TOLERANCE)
    with torch.inference_mode():
        base = net(x)
    torch.testing.assert_close(got[[2, 5]], base[[2, 5]], **TOLERANCE)
    assert not torch.allclose(got[[0, 1]], base[[0, 1]], atol=1e-2)  # the adapters act


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_mixed_batch_on_the_gpu_equals_the_cpu(tmp_path: Path) -> None:
    """Banks, slots and gather buffers follow the model onto its device."""
    net = Net().eval()
    every = ["conv", "dilated", "collapse", "head"]
    x_adapter = _publish(net, tmp_path / "x" / "1", every, 4, seed=1)
    y_adapter = _publish(net, tmp_path / "y" / "1", ["dilated"], 2, seed=2)
    adapters = [x_adapter, None, y_adapter, x_adapter]
    x = torch.randn(len(adapters), 3, 8, 8)
    cpu = MixedLoRA(copy.deepcopy(net), [(3, 8, 8)])(x, adapters)
    cuda = torch.device("cuda")
    gpu = MixedLoRA(copy.deepcopy(net).to(cuda), [(3, 8, 8)])(x.to(cuda), adapters)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)


def test_mixed_batch_equals_peft_itself(tmp_path: Path) -> None:
    net = Net().eval()
    peft_model = get_peft_model(
        copy.deepcopy(net),
        # Not the dilated layers: PEFT 0.21's unmerged conv LoRA builds lora_A without the
        # base layer's dilation, so its forward there disagrees with its own merged weights
        # (the test above checks those layers against merged weights).
        LoraConfig(r=3, lora_alpha=5, target_modules=["conv", "head"], init_lora_weights=False),
    ).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    from_peft = load_adapter(tmp_path / "peft", "peft", "1")
    other = _publish(net, tmp_path / "o" / "1", ["head"], 6, seed=3)
    adapters: list[Adapter | None] = [from_peft, None, other, from_peft]
    x = torch.randn(len(adapters), 3, 8, 8)
    got = MixedLoRA(copy.deepcopy(net), [(3, 8, 8)])(x, adapters)
    with torch.inference_mode():
        want = peft_model(x[[0, 3]])  # PEFT's own unmerged forward
    torch.testing.assert_close(got[[0, 3]], want, **TOLERANCE)


def test_a_full_pool_starts_over_with_every_adapter_of_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tandem.cloud.lora_pool, "MAX_SLOTS", 2)
    net = Net().eval()
    a, b, c = (_publish(net, tmp_path / n / "1", ["head"], 2, seed=i) for i, n in enumerate("abc"))
    mixed = MixedLoRA(copy.deepcopy(net), [(3, 8, 8)])
    x = torch.randn(2, 3, 8, 8)
    mixed(x, [a, b])  # the pool is full
    # One adapter the pool holds and one it lacks: the fresh pool must keep both.
    got = mixed(x, [a, c])
    torch.testing.assert_close(got, _row_by_row(net, x, [a, c]), **TOLERANCE)


def test_threads_sharing_the_copy_keep_their_own_rows(tmp_path: Path) -> None:
    net = Net().eval()
    one = _publish(net, tmp_path / "one" / "1", ["conv", "head"], 4, seed=4)
    two = _publish(net, tmp_path / "two" / "1", ["dilated", "head"], 2, seed=5)
    mixed = MixedLoRA(copy.deepcopy(net), [(3, 8, 8)])
    x = torch.randn(4, 3, 8, 8)
    mixes: list[list[Adapter | None]] = [[one, None, two, one], [two, two, None, one]]
    wants = [_row_by_row(net, x, m) for m in mixes]
    failures: list[str] = []

    def work(mix: list[Adapter | None], want: torch.Tensor) -> None:
        for _ in range(30):
            if not torch.allclose(mixed(x, mix), want, **TOLERANCE):
                failures.append("a row got another thread's adapter")

    threads = [threading.Thread(target=work, args=pair) for pair in zip(mixes, wants, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


# ------------------------------------------------------------------ the digits bundle's tail


def _bundle_adapters(bundle: Path) -> dict[str, Path]:
    """Three adapters on ``bundle``, each a different rank with different targets; "c"
    targets the decoder's first conv, which the decoder applies itself (no hook sees it)."""
    tail = TailRunner.from_bundle(bundle).model
    specs = {
        "a": (["tail.fc", "tail.layer4.1.conv2"], 4),
        "b": (["tail.layer4.0.conv1", "tail.layer4.0.downsample.0"], 2),
        "c": (["decoder.expand", "tail.fc"], 8),
    }
    paths = {}
    for seed, (name, (targets, rank)) in enumerate(specs.items()):
        paths[name] = bundle / "adapters" / name / "1"
        _publish(tail, paths[name], targets, rank, seed=10 + seed)
    return paths


@pytest.fixture()
def repo(tmp_path: Path, digits_bundle: Path) -> Path:
    repo = make_repo(tmp_path, digits_bundle)
    _bundle_adapters(repo / "digits")
    return repo


def _entry(bundle: Path) -> ModelEntry:
    return ModelEntry(bundle, read_manifest(bundle), TailRunner.from_bundle(bundle), 0.0)


def _load(bundle: Path, name: str | None) -> Adapter | None:
    return None if name is None else load_adapter(bundle / "adapters" / name / "1", name, "1")


def test_run_batch_mixes_batched_rows_with_merged_fallback_rows(repo: Path) -> None:
    bundle = repo / "digits"
    entry = _entry(bundle)
    names = [None, "a", "b", "c", "a", None, "c", "b"]
    adapters = [_load(bundle, n) for n in names]
    mixed = entry.mixed()
    assert "tail.fc" in mixed.adaptable and "decoder.expand" not in mixed.adaptable
    assert [mixed.serves(a) for a in adapters if a] == [True, True, False, True, False, True]
    requests = requests_for(bundle, load_data("digits").test.x[: len(names)], WIDTH, BITS)
    payloads = [from_message(r.features) for r in requests]
    payloads[5] = b"\x00garbage"  # fails alone
    out = run_batch(entry, adapters, payloads, WIDTH)
    assert set(out.errors) == {5}
    keep = [i for i in range(len(names)) if i != 5]
    x = torch.from_numpy(np.stack([codec.decode(payloads[i]) for i in keep]).astype(np.float32))
    want = _row_by_row(entry.runner.model, x, [adapters[i] for i in keep])
    np.testing.assert_allclose(out.logits, want.numpy(), **TOLERANCE)


def _expected(bundle: Path, requests: list[pb.InferRequest]) -> np.ndarray:
    tail = TailRunner.from_bundle(bundle).model
    decoded = [codec.decode(from_message(r.features)) for r in requests]
    x = torch.from_numpy(np.stack(decoded).astype(np.float32))
    return _row_by_row(tail, x, [_load(bundle, r.adapter or None) for r in requests]).numpy()


@pytest.mark.parametrize("compute", ["threads", "processes"])
def test_requests_naming_different_adapters_share_one_batch(
    repo: Path, compute: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ["", "a", "b", "c"] * 3
    requests = requests_for(repo / "digits", load_data("digits").test.x[: len(names)], 0.5, 4)
    for request, name in zip(requests, names, strict=True):
        request.adapter, request.return_logits = name, True
    batches: list[int] = []
    run = tandem.cloud.compute.run_targets

    def counted(targets: list[Any]) -> Any:
        batches.append(len(targets))
        return run(targets)

    monkeypatch.setattr(tandem.cloud.compute, "run_targets", counted)  # the thread backend's call
    # The batch closes when full, not on a timer: every request lands in the same one.
    cfg = config(repo, compute=compute, max_batch=len(names), max_delay_ms=10_000)

    async def main() -> list[pb.InferResponse]:
        async with running(cfg) as server, CloudClient(server.address) as client:
            results = await asyncio.gather(*map(client.infer, requests))
            return [r.response for r in results]

    responses = asyncio.run(main())
    assert [r.batch_size for r in responses] == [len(names)] * len(names)
    assert batches == ([len(names)] if compute == "threads" else [])
    assert [(r.adapter, r.adapter_version) for r in responses] == [
        (n, "1" if n else "") for n in names
    ]
    got = np.array([list(r.logits) for r in responses], dtype=np.float32)
    np.testing.assert_allclose(got, _expected(repo / "digits", requests), **TOLERANCE)
