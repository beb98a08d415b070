"""A bundle's head run by ONNX Runtime: the device needs no PyTorch.

``tandem export BUNDLE --onnx`` (:mod:`tandem.onnx_export`) writes, inside the bundle::

    onnx/head.json          the index: the bundle version it was exported from, and each
                            width's file and sha256
    onnx/head-<width>.onnx  the encoder at that width: uint8 images (N, C, H, W) in,
                            float32 bottleneck features (N, C', H', W') out, normalisation
                            included

:class:`OnnxHead` loads them, checks each file against the index and the index against the
bundle's manifest (a head exported from another version of the bundle is refused), and
computes features with ONNX Runtime on the CPU. The codecs after it are the same code as the
PyTorch head's (:class:`tandem.head.HeadCodec`): only the features can differ, by float
rounding (see the README for how often a payload's bytes differ).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from tandem.files import read_regular
from tandem.head import HeadCodec
from tandem.manifest import BundleError, Manifest, load_rate_points, read_manifest

ONNX_DIR = "onnx"
INDEX_FILE = "head.json"
MAX_INDEX_BYTES = 64 << 10
MAX_HEAD_BYTES = 512 << 20
"""A head's ONNX file is its encoder's weights plus a small graph (tens of KB for the shipped
recipes); a larger one is refused unread."""
INPUT_NAME, OUTPUT_NAME = "image", "features"


def head_file(width: float) -> str:
    """The ONNX file name of the head at ``width``."""
    return f"head-{width}.onnx"


def read_index(bundle: Path, manifest: Manifest) -> dict[str, Any]:
    """The bundle's ONNX index, checked against ``manifest``: BundleError says why not."""
    path = Path(bundle) / ONNX_DIR / INDEX_FILE
    try:
        index = json.loads(read_regular(path, MAX_INDEX_BYTES))
    except FileNotFoundError:
        raise BundleError(
            f"{bundle} has no ONNX head: run `tandem export {bundle} --onnx` first"
        ) from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} is unreadable: {exc}") from None
    heads = index.get("heads") if isinstance(index, dict) else None
    if not isinstance(heads, dict):
        raise BundleError(f"{path} is not an ONNX head index")
    if index.get("bundle_version") != manifest.version:
        raise BundleError(
            f"{path} was exported from bundle version {index.get('bundle_version')!r}, not "
            f"{manifest.version!r}: export it again"
        )
    missing = [w for w in manifest.bottleneck.widths if str(w) not in heads]
    if missing:
        raise BundleError(f"{path} lacks the widths {missing}: export it again")
    return index


class OnnxHead(HeadCodec):
    """Device side on ONNX Runtime: the bundle's head at every width, and its codecs."""

    def __init__(self, sessions: dict[float, Any], manifest: Manifest, points: list) -> None:
        super().__init__(manifest, points)
        self.sessions = sessions

    @classmethod
    def from_bundle(cls, bundle: Path, threads: int | None = None) -> OnnxHead:
        """Load every width's ONNX head, each hash-checked against the bundle's index;
        ``threads`` caps ONNX Runtime's threads per run (default: its own choice)."""
        import onnxruntime as ort  # the [edge] extra's one dependency beyond the core

        manifest = read_manifest(bundle)
        index = read_index(bundle, manifest)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        sessions = {}
        for width in manifest.bottleneck.widths:
            data = _verified(bundle, index["heads"][str(width)])
            sessions[width] = ort.InferenceSession(
                data, options, providers=["CPUExecutionProvider"]
            )
        return cls(sessions, manifest, load_rate_points(bundle, manifest))

    def features(self, x: np.ndarray, width: float, batch_size: int = 512) -> np.ndarray:
        """The float32 bottleneck tensors for uint8 inputs ``(N, C, H, W)`` at ``width``."""
        self.check_input(x)
        self.check_width(width)
        session = self.sessions[width]
        out = [
            session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x[i : i + batch_size])})[0]
            for i in range(0, len(x), batch_size)
        ]
        return np.concatenate(out).astype(np.float32, copy=False)


def _verified(bundle: Path, entry: Any) -> bytes:
    """The bytes of one indexed ONNX file, checked against its sha256."""
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or "/" in name or name.startswith("."):
        raise BundleError(f"{bundle}: the ONNX index names a bad file {name!r}")
    path = Path(bundle) / ONNX_DIR / name
    try:
        data = read_regular(path, MAX_HEAD_BYTES)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} is unreadable: {exc}") from None
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise BundleError(f"{path} does not match its sha256 in {INDEX_FILE}")
    return data
