"""Checkpoints round-trip weights and optimizer state without pickle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from tandem.checkpoint import Checkpointer, CheckpointError, PhaseStatus


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(4, 3)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_round_trip_restores_weights_and_optimizer(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, opt)
    ckpt = Checkpointer(tmp_path, "abc")
    ckpt.save("phase", 1, {"m": model}, opt, done=False)
    raw = (tmp_path / "phase.safetensors").read_bytes()
    assert b"pickle" not in raw and not raw.startswith(b"\x80")

    clone = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 1))
    clone_opt = torch.optim.AdamW(clone.parameters(), lr=1e-2)
    reopened = Checkpointer(tmp_path, "abc")
    assert reopened.status("phase") is not None
    assert reopened.restore("phase", {"m": clone}, clone_opt) == 1
    for a, b in zip(model.state_dict().values(), clone.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    torch.manual_seed(1)
    _step(model, opt)
    torch.manual_seed(1)
    _step(clone, clone_opt)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_other_fingerprint_refused_unless_fresh(tmp_path: Path) -> None:
    Checkpointer(tmp_path, "one").save("p", 0, {}, None, done=True)
    with pytest.raises(CheckpointError, match="--fresh"):
        Checkpointer(tmp_path, "two")
    assert Checkpointer(tmp_path, "two", fresh=True).status("p") is None


def test_done_phase_has_no_optimizer_state(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    _step(model, opt)
    ckpt = Checkpointer(tmp_path, "f")
    ckpt.save("p", 3, {"m": model}, opt, done=True)
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        assert "optimizer" not in (f.metadata() or {})
        assert not [k for k in f.keys() if k.startswith("optim.")]  # noqa: SIM118
    assert Checkpointer(tmp_path, "f").status("p") == PhaseStatus(3, True)


def test_corrupt_checkpoint_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "p.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        Checkpointer(tmp_path, "f")


def test_mismatched_modules_are_a_checkpoint_error(tmp_path: Path) -> None:
    Checkpointer(tmp_path, "f").save("p", 1, {"m": nn.Linear(3, 2)}, None, done=True)
    with pytest.raises(CheckpointError, match="does not fit"):
        Checkpointer(tmp_path, "f").restore("p", {"m": nn.Linear(4, 2)})


def test_missing_phase(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Checkpointer(tmp_path, "x").restore("absent", {})
