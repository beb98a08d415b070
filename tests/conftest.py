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


@pytest.fixture(scope="session")
def digits_entropy_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits bundle with two rate points (β 0.05 and 2.0) and one quantise+zstd depth."""
    from tandem.build import build_bundle
    from tandem.config import load_recipe
    from tandem.data import load_data

    out = tmp_path_factory.mktemp("bundle") / "digits-entropy"
    overrides = [*TINY, "rate.betas=[0.05, 2.0]", "eval_bits=[4]"]
    build_bundle(load_recipe("digits", overrides), load_data("digits"), out)
    return out


@pytest.fixture(scope="session")
def mnist_small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A quickly trained MNIST bundle and the npz it was trained on.

    The npz holds 2,000 real training rows and the real 10,000-row test split, so a source
    ``npz:PATH`` sends real MNIST test digits. One epoch per phase: the model is weak, but
    the serving tests compare predictions between runs, not against labels.
    """
    import numpy as np

    from tandem.build import build_bundle
    from tandem.config import load_recipe
    from tandem.data import load_data

    if not MNIST.is_file():
        pytest.skip(f"{MNIST} is not there")
    root = tmp_path_factory.mktemp("mnist")
    with np.load(MNIST) as archive:
        x, y = archive["x"], archive["y"]
    npz = root / "mnist-small.npz"
    np.savez(
        npz, x=np.concatenate([x[:2000], x[-10_000:]]), y=np.concatenate([y[:2000], y[-10_000:]])
    )
    # No rate points: the recipe's are trained and served by the digits entropy fixture's
    # tests; here they would only add minutes of measuring to the serving tests' set-up.
    overrides = [
        "teacher.train.epochs=1",
        "distill.head.epochs=1",
        "distill.finetune.epochs=1",
        "eval_bits=[4]",
        "rate.betas=[]",
    ]
    out = root / "bundle"
    build_bundle(load_recipe("mnist", overrides), load_data(f"npz:{npz}"), out)
    return out, npz
