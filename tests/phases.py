"""A tiny training phase on random tensors, for tests of how PhaseRunner trains and resumes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tandem.checkpoint import Checkpointer
from tandem.config import OptimConfig
from tandem.data import Batch
from tandem.train import PhaseRunner

X, Y = torch.randn(64, 6, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 3


def run_phase(
    folder: Path, cfg: OptimConfig, make_model: Callable[[], nn.Module], **runner: Any
) -> nn.Module:
    """Seed, build the model, and train it on (X, Y) for ``cfg``, checkpointing into
    ``folder``; ``runner`` are PhaseRunner's keyword arguments (device, precision)."""
    torch.manual_seed(0)
    model = make_model()
    phase = PhaseRunner(
        Checkpointer(folder, "fp"),
        lambda order: (Batch(i, X[i], Y[i]) for i in order),
        seed=0,
        show_progress=False,
        **runner,
    )
    phase.run("p", cfg, {"m": model}, len(Y), lambda b, g: F.cross_entropy(model(b.x), b.y))
    return model


def crash_after(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Make the ``n``-th checkpoint save of a run end it, as an interrupt would."""
    real_save = Checkpointer.save
    saves = {"n": 0}

    def save_then_maybe_crash(self: Checkpointer, *args: Any, **kwargs: Any) -> None:
        real_save(self, *args, **kwargs)
        saves["n"] += 1
        if saves["n"] == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "save", save_then_maybe_crash)


def assert_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train: Callable[[Path], nn.Module]
) -> None:
    """A run interrupted after its first epoch and run again ends with exactly the weights of
    an uninterrupted one, even with the global RNG disturbed in between."""
    straight = train(tmp_path / "a")
    with monkeypatch.context() as patch:
        crash_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            train(tmp_path / "b")
    torch.randn(1000)  # disturb the global RNG, as a fresh process would
    resumed = train(tmp_path / "b")
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
