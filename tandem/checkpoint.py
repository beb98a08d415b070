"""Resumable training checkpoints, written without pickle.

A run directory keeps ``checkpoint/state.json`` (which phases are done and how far the
current one got) and one ``<phase>.safetensors`` per phase holding module weights and the
optimizer's tensors. Non-tensor optimizer state goes in the JSON. Each file is replaced
atomically, so a run killed at any moment resumes from its last finished epoch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to a different run."""


@dataclass(frozen=True)
class PhaseStatus:
    """How far a training phase got: epochs finished, and whether it is complete."""

    epochs_done: int
    done: bool


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value.contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


class Checkpointer:
    """Saves and restores the phases of one training run in ``folder``."""

    def __init__(self, folder: Path, fingerprint: str, *, fresh: bool = False) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self._state_path = folder / "state.json"
        self._state: dict[str, Any] = {"fingerprint": fingerprint, "phases": {}}
        if self._state_path.exists() and not fresh:
            saved = json.loads(self._state_path.read_text())
            if saved.get("fingerprint") != fingerprint:
                raise CheckpointError(
                    f"{folder} holds a checkpoint of a different recipe or data set; "
                    "pass --fresh to discard it, or choose another --out"
                )
            self._state = saved
        folder.mkdir(parents=True, exist_ok=True)

    def status(self, phase: str) -> PhaseStatus | None:
        """Progress recorded for ``phase``, or None if it never saved."""
        entry = self._state["phases"].get(phase)
        return PhaseStatus(entry["epochs_done"], entry["done"]) if entry else None

    def save(
        self,
        phase: str,
        epochs_done: int,
        modules: dict[str, nn.Module],
        optimizer: torch.optim.Optimizer | None,
        *,
        done: bool,
    ) -> None:
        """Record ``phase`` after ``epochs_done`` epochs, with weights and optimizer state."""
        tensors = {
            f"{prefix}.{key}": value.detach().contiguous()
            for prefix, module in modules.items()
            for key, value in module.state_dict().items()
        }
        entry: dict[str, Any] = {"epochs_done": epochs_done, "done": done}
        if optimizer is not None and not done:
            opt_tensors, entry["optimizer"] = _flatten_optimizer(optimizer)
            tensors.update(opt_tensors)
        _atomic_write(self.folder / f"{phase}.safetensors", lambda p: save_file(tensors, str(p)))
        self._state["phases"][phase] = entry
        _atomic_write(self._state_path, lambda p: p.write_text(json.dumps(self._state, indent=1)))

    def restore(
        self,
        phase: str,
        modules: dict[str, nn.Module],
        optimizer: torch.optim.Optimizer | None = None,
    ) -> int:
        """Load ``phase``'s weights (and optimizer state) in place; return epochs done."""
        entry = self._state["phases"].get(phase)
        path = self.folder / f"{phase}.safetensors"
        if entry is None or not path.exists():
            raise CheckpointError(f"no checkpoint for phase {phase!r} in {self.folder}")
        tensors = load_file(str(path))
        for prefix, module in modules.items():
            head = f"{prefix}."
            own = {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}
            module.load_state_dict(own, strict=True)
        if optimizer is not None and "optimizer" in entry:
            optimizer.load_state_dict(_unflatten_optimizer(tensors, entry["optimizer"]))
        return int(entry["epochs_done"])
