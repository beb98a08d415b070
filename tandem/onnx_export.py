"""``tandem export BUNDLE --onnx``: the bundle's head as ONNX, one file per width.

Each file takes uint8 images (batch dynamic) and returns the float32 features the PyTorch
head returns at that width: the normalisation is part of the graph, so the device does
nothing but hand over pixels. Exported with ``torch.onnx``'s ``torch.export``-based exporter,
weights inside the file. Every width is checked after export: ONNX Runtime runs it on
random images and the largest difference from PyTorch's features is recorded in the index
(``max_abs_diff``) and refused above :data:`MAX_DIFF`.

The index (``onnx/head.json``) is written last, so a half-finished export is no export;
see :mod:`tandem.onnx_head` for the layout and how a device loads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tandem.bottleneck import BottleneckEncoder
from tandem.bundle import HeadRunner
from tandem.data import normalize_tensor
from tandem.onnx_head import INDEX_FILE, INPUT_NAME, ONNX_DIR, OUTPUT_NAME, head_file

MAX_DIFF = 1e-3
"""Largest difference from PyTorch's features accepted for an exported head: float32
rounding differs by about 1e-6 here; a wrong graph by O(1)."""
CHECK_ROWS = 64


class _PixelsToFeatures(nn.Module):
    """uint8 images to the bottleneck features at one width, normalisation included."""

    def __init__(
        self, encoder: BottleneckEncoder, mean: list[float], std: list[float], width: float
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.mean, self.std, self.width = mean, std, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of uint8 images ``(N, C, H, W)``: the normalisation HeadRunner.features
        applies (the same function), then the encoder."""
        return self.encoder.encode(normalize_tensor(x, self.mean, self.std), self.width)


def export_onnx(bundle: Path) -> dict[str, Any]:
    """Write ``bundle/onnx/``: each width's head and the index; return the index."""
    head = HeadRunner.from_bundle(bundle)
    spec = head.manifest.input
    out = Path(bundle) / ONNX_DIR
    out.mkdir(exist_ok=True)
    gen = np.random.default_rng(0)
    probe = gen.integers(0, 256, (CHECK_ROWS, *spec.shape), dtype=np.uint8)
    heads, written = {}, []
    for width in head.manifest.bottleneck.widths:
        module = _PixelsToFeatures(head.encoder, spec.mean, spec.std, width).eval()
        data = _export(module, probe[:2])
        diff = _largest_difference(data, probe, head.features(probe, width))
        if not diff <= MAX_DIFF:  # NaN fails too
            raise RuntimeError(f"the ONNX head at width {width} differs from PyTorch by {diff}")
        # Written aside, moved in once every width passed: a failed export changes nothing.
        (out / (head_file(width) + ".tmp")).write_bytes(data)
        written.append(head_file(width))
        heads[str(width)] = {
            "file": head_file(width),
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "max_abs_diff": diff,
        }
    index = {
        "bundle_version": head.manifest.version,
        "exporter": f"torch {torch.__version__} torch.onnx (dynamo)",
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "heads": heads,
    }
    (out / INDEX_FILE).unlink(missing_ok=True)  # no index describes a half-moved export
    for name in written:
        os.replace(out / (name + ".tmp"), out / name)
    tmp = out / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, out / INDEX_FILE)
    return index


def _export(module: nn.Module, example: np.ndarray) -> bytes:
    """``module`` as one ONNX model (weights inside), its batch dimension dynamic."""
    # The exporter reports its steps on stdout, which `--json` keeps for its one document;
    # its notes on torchvision's operators (not installed, not used) and torch's own pytree
    # deprecations say nothing about this export.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with (
            contextlib.redirect_stdout(sys.stderr),
            warnings.catch_warnings(),
            torch.no_grad(),
        ):
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                module,
                (torch.from_numpy(example),),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    assert program is not None
    return bytes(program.model_proto.SerializeToString())


def _largest_difference(data: bytes, x: np.ndarray, expected: np.ndarray) -> float:
    """The largest absolute difference between ONNX Runtime's features and ``expected``."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return float(np.abs(got - expected).max())
