"""The Python API (tandem.cut_points, split_at, build_bundle) on networks outside the zoo,
and examples/custom_cnn.py end to end: trained, bundled, then served over real gRPC by a
process that never had the example's code."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from serving import ROOT, config, make_repo, running
from torch import nn

import tandem
from tandem.bundle import FULL_FILE, read_manifest
from tandem.data import DataSpecError, from_datasets, load_data
from tandem.edge.config import DaemonConfig
from tandem.edge.daemon import EdgeDaemon
from tandem.evaluate import evaluate_bundle
from tandem.exported import ProgramError
from tandem.manifest import PROGRAM_FILE
from tandem.split import SplitError, UnknownCutError


class Small(nn.Module):
    """Not in the zoo: two convolutions, a pooled linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(self.stem(x)))


class Noisy(Small):
    """Its output changes from call to call: no split of it can match it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + torch.randn_like(out)


class Summed(Small):
    """Its tail calls an operator outside those a loaded tail may call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(self.stem(x))).cumsum(1)


class Pairs(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """(uint8 image, label) items, as a user's data set yields them."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = torch.from_numpy(x), y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Any:
        return self.x[i], int(self.y[i])


def test_the_api_is_exported_from_the_package() -> None:
    names = ("cut_points", "split_at", "build_bundle", "train_recipe")
    assert set(names) <= set(tandem.__all__)
    for name in names:
        assert getattr(tandem, name).__doc__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = tandem.nope  # type: ignore[attr-defined]


def test_cut_points_lists_every_cut_with_its_shape_and_costs() -> None:
    cuts = tandem.cut_points(Small(), torch.zeros(2, 1, 8, 8))
    by_name = {c.name: c for c in cuts}
    assert list(by_name)[:4] == ["stem.0", "stem", "down.0", "down"]
    assert by_name["down"].shape == (16, 4, 4) and by_name["down"].raw_bytes == 16 * 4 * 4 * 4
    assert by_name["down"].head_flops > by_name["stem"].head_flops > 0
    assert by_name["down"].head_latency_ms is None  # untimed


def test_cut_points_times_the_named_cuts_on_request() -> None:
    ticks: list[None] = []
    cuts = tandem.cut_points(
        Small(), torch.zeros(1, 1, 8, 8), repeats=3, cuts=["down", "stem"],
        progress=lambda: ticks.append(None),
    )  # fmt: skip
    assert [c.name for c in cuts] == ["stem", "down"]  # execution order
    assert all(c.head_latency_ms is not None and c.head_latency_ms > 0 for c in cuts)
    assert len(ticks) == 2
    with pytest.raises(UnknownCutError, match="Did you mean"):
        tandem.cut_points(Small(), torch.zeros(1, 1, 8, 8), cuts=["dwn"])


def test_split_at_returns_halves_that_compute_the_model() -> None:
    model, x = Small().eval(), torch.randn(3, 1, 8, 8)
    head, tail = tandem.split_at(model, "down", x)
    with torch.no_grad():
        assert torch.equal(tail(head(x)), model(x))
    with pytest.raises(UnknownCutError, match="Did you mean"):
        tandem.split_at(model, "dwn", x)


def test_split_at_refuses_a_split_that_does_not_reproduce_the_model() -> None:
    with pytest.raises(SplitError, match="differs from model"):
        tandem.split_at(Noisy(), "down", torch.randn(3, 1, 8, 8))


def _digits_pairs() -> tuple[Pairs, Pairs]:
    data = load_data("digits")
    return Pairs(data.train.x, data.train.y), Pairs(data.test.x, data.test.y)


def test_from_datasets_reads_a_users_data_set_item_by_item() -> None:
    train, test = _digits_pairs()
    data = from_datasets(train, test)
    assert data.input_shape == (1, 8, 8) and data.classes == [str(i) for i in range(10)]
    assert np.array_equal(data.test.take([3, 1]), test.x.numpy()[[3, 1]])
    assert np.array_equal(data.train.y, train.y)
    sub = data.test.subset([5, 2])
    assert np.array_equal(sub.take([0, 1]), test.x.numpy()[[5, 2]])


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ((np.zeros((1, 8, 8), np.float32), 0), "must be a uint8 \\(C, H, W\\) tensor"),
        ((np.zeros((8, 8), np.uint8), 0), "must be a uint8"),
        ((np.zeros((1, 8, 8), np.uint8), "cat"), "label 'cat' is not an integer"),
        (np.zeros((1, 8, 8), np.uint8), "not an \\(image, label\\) pair"),
        ((np.zeros((1, 8, 8), np.uint8), torch.tensor([1, 2])), "is not an integer"),
    ],
)
def test_a_bad_item_is_one_line_naming_its_index(item: Any, message: str) -> None:
    class Bad(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> Any:
            return item

    with pytest.raises(DataSpecError, match=f"item 0.*{message}"):
        from_datasets(Bad(), Bad())


def test_labels_outside_the_named_classes_are_refused() -> None:
    train, test = _digits_pairs()
    with pytest.raises(DataSpecError, match=r"labels must lie in 0\.\.2"):
        from_datasets(train, test, classes=["a", "b", "c"])


def test_build_bundle_refuses_bad_normalisation_and_cuts_before_training(
    tmp_path: Path,
) -> None:
    train, test = _digits_pairs()
    with pytest.raises(ValueError, match="both mean and std"):
        tandem.build_bundle(Small(), "down", train, test, out=tmp_path, mean=[0.5])
    with pytest.raises(ValueError, match="1 values each"):
        tandem.build_bundle(Small(), "down", train, test, out=tmp_path, mean=[0, 0], std=[1, 1])
    with pytest.raises(UnknownCutError):
        tandem.build_bundle(Small(), "layer2", train, test, out=tmp_path)
    with pytest.raises(ProgramError, match=r"calls 'torch\.ops\.aten\.cumsum\.default'"):
        tandem.build_bundle(Summed(), "down", train, test, out=tmp_path)
    assert not (tmp_path / "checkpoint").exists()


QUICK = ["distill.head.epochs=3", "distill.finetune.epochs=3", "eval_bits=[4]"]


@pytest.fixture(scope="module")
def example_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """examples/custom_cnn.py, run as a user runs it: in a process of its own."""
    out = tmp_path_factory.mktemp("example") / "tinynet"
    sets = [arg for s in QUICK for arg in ("--set", s)]
    argv = [sys.executable, str(ROOT / "examples" / "custom_cnn.py"), "--out", str(out)]
    done = subprocess.run(
        [*argv, "--epochs", "15", *sets], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out, json.loads(done.stdout.splitlines()[-1])


def _serve_digits(
    tmp_path: Path, repo: Path, bundle: Path, **fields: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The daemon's summary and sink lines for the digits test split sent at width 1, 4 bits,
    to a service over ``repo``."""
    values = {"bundle": bundle, "cloud": "127.0.0.1:1", "source": "digits",
              "sink": str(tmp_path / "out.jsonl"), "width": 1.0, "bits": 4, **fields}  # fmt: skip
    cfg = DaemonConfig.model_validate(values)

    async def serve() -> dict[str, Any]:
        async with running(config(repo)) as srv:
            return await EdgeDaemon(cfg.model_copy(update={"cloud": srv.address})).run()

    summary = asyncio.run(serve())
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    return summary, records


@pytest.mark.slow
def test_the_example_bundle_serves_over_grpc_without_the_examples_code(
    tmp_path: Path, example_bundle: tuple[Path, dict[str, Any]]
) -> None:
    bundle, printed = example_bundle
    manifest = read_manifest(bundle)
    assert manifest.arch.name == "TinyNet" and manifest.tail_format == "exported"
    assert (bundle / PROGRAM_FILE).is_file() and not (bundle / FULL_FILE).exists()
    assert printed["teacher_accuracy"] == manifest.teacher_accuracy > 0.9
    assert printed["cuts"]["features"] == [32, 4, 4]
    # Nothing of the example was ever imported here: the service rebuilds its tail from
    # tail.program.json alone.
    assert not any("custom_cnn" in name for name in sys.modules)
    assert not any(type(o).__name__ == "TinyNet" for o in gc.get_objects())

    repo = make_repo(tmp_path, bundle, "tinynet")
    test = load_data("digits").test
    summary, records = _serve_digits(tmp_path, repo, bundle)
    assert summary["served"] == len(records) == len(test) and summary["served_locally"] == 0
    served = np.mean([r["prediction"] == r["label"] for r in records])
    (point,) = [p for p in evaluate_bundle(bundle, test, [4])["points"] if p["width"] == 1.0]
    assert served == point["accuracy"] > 0.8
    (listed,) = [p for p in manifest.table if p.width == 1.0 and p.bits == 4]
    assert listed.accuracy == point["accuracy"]  # the exported tail serves what was measured


@pytest.mark.slow
def test_lora_on_an_exported_tail_adapts_the_decoder_and_serves_it(
    tmp_path: Path, example_bundle: tuple[Path, dict[str, Any]]
) -> None:
    from tandem.bundle import HeadRunner, TailRunner
    from tandem.federated.lora import (
        LoraError,
        attach,
        lora_arrays,
        merge_into,
        publish,
        resolve_targets,
    )
    from tandem.federated.task import tail_model

    bundle, _ = example_bundle
    targets = resolve_targets(tail_model(str(bundle)), "auto")
    assert targets and all(t.startswith("decoder.") for t in targets)
    with pytest.raises(LoraError, match="exported tail"):
        resolve_targets(tail_model(str(bundle)), "classifier.4")

    # An adapter as a federation publishes it, its B drawn so that it changes answers.
    arrays = lora_arrays(attach(tail_model(str(bundle)), targets, rank=2, alpha=4.0))
    gen = np.random.default_rng(0)
    arrays = {k: (v if k.endswith("lora_A") else gen.normal(0, 0.5, v.shape).astype(np.float32))
              for k, v in arrays.items()}  # fmt: skip
    repo = make_repo(tmp_path, bundle, "tinynet")
    publish(repo / "tinynet" / "adapters" / "fed" / "1", arrays, alpha=4.0)

    test = load_data("digits").test
    payloads = HeadRunner.from_bundle(bundle).encode(test.x, 1.0, 4)
    base = TailRunner.from_bundle(bundle)
    merged = base.fresh_model()
    merge_into(merged, arrays, 4.0 / 2)
    with torch.no_grad():
        expected = merged(base.unpack(payloads)).argmax(1).numpy()
        plain = base.infer(payloads).argmax(1)
    assert (expected != plain).any()

    summary, records = _serve_digits(tmp_path, repo, bundle, adapter="fed")
    assert summary["served"] == len(test) and summary["errors"] == 0
    served = np.array([r["prediction"] for r in sorted(records, key=lambda r: r["input_index"])])
    assert np.array_equal(served, expected)


@pytest.mark.slow
def test_the_service_refuses_an_adapter_on_an_exported_tails_layers_saying_why(
    example_bundle: tuple[Path, dict[str, Any]],
) -> None:
    from tandem.adapters import Adapter, AdapterError, merged_state
    from tandem.bundle import TailRunner

    runner = TailRunner.from_bundle(example_bundle[0])
    adapter = Adapter(
        "a", "1", "", 1, 1.0, 1.0, deltas={"tail.classifier.4.weight": torch.zeros(10, 64)}
    )
    with pytest.raises(AdapterError, match=r"exported tail.*decoder"):
        merged_state(runner.model, adapter)
