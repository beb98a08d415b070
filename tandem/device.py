"""Where computation runs: ``--device auto|cpu|cuda[:N]``, and mixed precision on CUDA.

One spelling for every command that computes (so far train, eval and profile). ``auto``
takes the first CUDA device when PyTorch sees one, else the CPU. A CUDA device this machine
lacks is a one-line :class:`DeviceError`, never a fallback: a user who asked for the GPU must
not get a silent CPU run.

Whatever the device, what is written to disk (bundles, checkpoints) holds CPU tensors, so a
bundle trained on a GPU serves on a CPU and the other way round.
"""

from __future__ import annotations

import contextlib
import re
from typing import Literal

import torch

CPU = torch.device("cpu")
DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"
Precision = Literal["fp32", "bf16", "fp16"]
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """A device was named that does not exist here, or in a form not understood."""


def resolve_device(spec: str) -> torch.device:
    """The torch device for ``spec`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return CPU
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match is None:
        raise DeviceError(f"unknown device {spec!r}: expected {DEVICE_HELP}")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} asked for, but PyTorch sees no CUDA device here")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise DeviceError(
            f"device {spec!r} asked for, but there are {torch.cuda.device_count()} CUDA devices"
        )
    return torch.device("cuda", index)


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """Mixed-precision autocast for a training step: bf16 or fp16 on CUDA, and nothing on
    the CPU or in fp32 (the CPU's own autocast is slower than fp32 on the cores we target)."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=_AUTOCAST[precision])


def grad_scaler(device: torch.device, precision: Precision) -> torch.amp.GradScaler:
    """The loss scaler fp16 needs on CUDA (disabled, a pass-through, otherwise)."""
    enabled = device.type == "cuda" and precision == "fp16"
    return torch.amp.GradScaler("cuda" if enabled else "cpu", enabled=enabled)


def describe(device: torch.device) -> str:
    """A device's name for reports: ``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer around it measures the work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
