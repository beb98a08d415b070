"""Shared fixtures: a tiny digits bundle trained once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared"
MNIST = SHARED / "data" / "mnist.npz"

# A few epochs of each phase: enough to learn digits well above chance, fast enough for CI.
TINY = [
    "teacher.train.epochs=3",
    "distill.head.epochs=2",
    "distill.finetune.epochs=2",
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> Iterator[None]:
    """Run on one thread: for models this small, thread hand-offs cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle built by the digits recipe with shortened phases."""
    from tandem.build import build_bundle
    from tandem.config import load_recipe
    from tandem.data import load_data

    out = tmp_path_factory.mktemp("bundle") / "digits"
    build_bundle(load_recipe("digits", TINY), load_data("digits"), out)
    return out
