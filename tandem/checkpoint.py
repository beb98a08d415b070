"""Resumable training checkpoints, written without pickle.

A run directory keeps one ``checkpoint/<phase>.safetensors`` per training phase, holding the
module weights and the optimizer's tensors. Its metadata says whose run it is (the
fingerprint of recipe and data), how many epochs are done, and the optimizer's non-tensor
state as JSON. One file per phase, replaced atomically, is the whole record: a run killed at
any moment resumes from its last finished epoch, and never finds weights and progress that
disagree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
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
                tensors[f"optim.{pid}.{key}"] = value.cpu().contiguous()
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
        folder.mkdir(parents=True, exist_ok=True)
        for path in folder.glob("*.safetensors"):
            if fresh:
                path.unlink()
            elif self._metadata(path).get("fingerprint") != fingerprint:
                raise CheckpointError(
                    f"{folder} holds a checkpoint of a different recipe or data set; "
                    "pass --fresh to discard it, or choose another --out"
                )

    def _path(self, phase: str) -> Path:
        return self.folder / f"{phase}.safetensors"

    @staticmethod
    def _metadata(path: Path) -> dict[str, str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return dict(f.metadata() or {})
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"unreadable checkpoint {path}: {exc}") from exc

    def status(self, phase: str) -> PhaseStatus | None:
        """Progress recorded for ``phase``, or None if it never saved."""
        path = self._path(phase)
        if not path.exists():
            return None
        meta = self._metadata(path)
        return PhaseStatus(int(meta["epochs_done"]), meta["done"] == "true")

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
            # On the CPU whatever the training device: a checkpoint resumes on any device.
            f"{prefix}.{key}": value.detach().cpu().contiguous()
            for prefix, module in modules.items()
            for key, value in module.state_dict().items()
        }
        meta = {
            "fingerprint": self.fingerprint,
            "epochs_done": str(epochs_done),
            "done": "true" if done else "false",
        }
        if optimizer is not None and not done:
            opt_tensors, opt_meta = _flatten_optimizer(optimizer)
            tensors.update(opt_tensors)
            meta["optimizer"] = json.dumps(opt_meta)
        _atomic_write(self._path(phase), lambda p: save_file(tensors, str(p), metadata=meta))

    def restore(
        self,
        phase: str,
        modules: dict[str, nn.Module],
        optimizer: torch.optim.Optimizer | None = None,
    ) -> int:
        """Load ``phase``'s weights (and optimizer state) in place; return epochs done."""
        path = self._path(phase)
        if not path.exists():
            raise CheckpointError(f"no checkpoint for phase {phase!r} in {self.folder}")
        meta = self._metadata(path)
        try:
            tensors = load_file(str(path))
            for prefix, module in modules.items():
                head = f"{prefix}."
                own = {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}
                module.load_state_dict(own, strict=True)
            if optimizer is not None and "optimizer" in meta:
                opt_meta = json.loads(meta["optimizer"])
                optimizer.load_state_dict(_unflatten_optimizer(tensors, opt_meta))
        except (SafetensorError, RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {exc}") from exc
        return int(meta["epochs_done"])
