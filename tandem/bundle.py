"""Bundles: the directory that is the unit of deployment.

Layout::

    manifest.json        validated by :class:`Manifest`; holds the sha256 of every weight file
    head.safetensors     the bottleneck encoder (device side)
    tail.safetensors     the decoder and the original model's tail (cloud side)
    tail.program.json    with ``tail_format`` "exported" (a model outside the zoo): the tail's
                         graph, exported by torch.export (:mod:`tandem.exported`); its
                         weights are in tail.safetensors all the same
    full.safetensors     optional: the whole original model, a local fallback
    entropy.safetensors  with rate points (format 2): their gains, medians and quantized
                         tables, read by both sides (:mod:`tandem.entropy_points`)

No pickle is involved anywhere. Each side loads, and hash-checks, only its own file: a
device holding a bundle never reads tail weights, so the two directories may differ.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from tandem import codec, entropy_codec
from tandem.adapters import AdapterError, load_adapter, merged_state
from tandem.bottleneck import BottleneckDecoder, BottleneckEncoder, CloudTail, width_channels
from tandem.data import normalize
from tandem.entropy_points import ENTROPY_FILE, RatePoint, save_points
from tandem.exported import MAX_PROGRAM_BYTES, ProgramError, load_program
from tandem.head import HeadCodec
from tandem.lru import lru_get
from tandem.manifest import (
    FULL_FILE,
    HEAD_FILE,
    HEADER_BYTES_PER_TENSOR,
    HEADER_MARGIN,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    PROGRAM_FILE,
    TAIL_FILE,
    BottleneckSpec,
    BundleError,
    CodecDefaults,
    EntropySpec,
    InputSpec,
    Manifest,
    TablePoint,
    load_rate_points,
    read_manifest,
    sha256_file,
    verified_bytes,
)
from tandem.models import build_model
from tandem.split import split_model

# The manifest's names are this module's too: callers read bundles through one module.
__all__ = [
    "FULL_FILE", "HEAD_FILE", "MANIFEST", "MAX_MANIFEST_BYTES", "PROGRAM_FILE", "TAIL_FILE",
    "BottleneckSpec", "BundleError", "CodecDefaults", "EntropySpec", "HeadRunner", "InputSpec",
    "Manifest", "TablePoint", "TailRunner", "bottleneck_shapes", "build_arch", "copy_bundle",
    "load_full", "load_rate_points", "read_manifest", "sha256_file", "tail_bytes",
    "tail_template", "tensor_bytes", "verified_bytes", "write_bundle",
]  # fmt: skip


def tensor_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes, count) of the tensors in ``module``'s state dict: what its weight file holds.

    Works on the meta device, where building a module allocates nothing.
    """
    state = module.state_dict()
    return sum(t.numel() * t.element_size() for t in state.values()), len(state)


def _load_verified(
    bundle: Path, manifest: Manifest, name: str, expected: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of weight file ``name``, checked against the manifest's sha256.

    With ``expected`` (tensor bytes and count, from :func:`tensor_bytes`), a file whose size
    cannot hold exactly those tensors is refused before any of it is read.
    """
    low, high = (0, None) if expected is None else _size_range(*expected)
    data = verified_bytes(bundle, manifest, name, low, high)
    try:
        return load_safetensors(data)
    except SafetensorError as exc:
        raise BundleError(f"{bundle}: {name} is unreadable: {exc}") from exc


def _size_range(tensors: int, count: int) -> tuple[int, int]:
    """The sizes a safetensors file holding ``count`` tensors of ``tensors`` bytes can have."""
    low = 8 + tensors
    return low, low + HEADER_MARGIN + HEADER_BYTES_PER_TENSOR * count


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{what} weights do not fit the manifest's architecture: {exc}") from exc


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def write_bundle(
    out: Path,
    manifest_fields: dict[str, Any],
    encoder: nn.Module,
    cloud_tail: nn.Module,
    full: nn.Module | None = None,
    points: Sequence[RatePoint] = (),
    program: bytes | None = None,
) -> Manifest:
    """Write weights and hashes, then the manifest last: a half-written bundle is invalid.

    ``points`` are the rate points of an entropy model, written to ``entropy.safetensors``;
    ``program`` is an exported tail's graph (:func:`tandem.exported.export_program`),
    written to ``tail.program.json`` (the manifest then needs ``tail_format`` "exported").
    """
    out.mkdir(parents=True, exist_ok=True)
    weights = {HEAD_FILE: encoder, TAIL_FILE: cloud_tail}
    if full is not None:
        weights[FULL_FILE] = full
    files = {}
    for name, module in weights.items():
        save_file(_state(module), str(out / name))
        files[name] = sha256_file(out / name)
    if points:
        save_points(points, out / ENTROPY_FILE)
        files[ENTROPY_FILE] = sha256_file(out / ENTROPY_FILE)
    if program is not None:
        (out / PROGRAM_FILE).write_bytes(program)
        files[PROGRAM_FILE] = sha256_file(out / PROGRAM_FILE)
    # The version names the weights: any retrain that changes them gets a new one.
    version = hashlib.sha256("".join(sorted(files.values())).encode()).hexdigest()[:12]
    manifest = Manifest.model_validate({"version": version, **manifest_fields, "files": files})
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


def copy_bundle(bundle: Path, repo: Path, name: str | None = None) -> Path:
    """Copy ``bundle`` into the model repository ``repo`` as ``repo/NAME`` (default: its
    directory name), leaving out training state (``checkpoint/``); return the copy's path.

    A copy, never a link: the service refuses links that leave its repository.
    """
    dest = repo / (name or bundle.name)
    repo.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle, dest, ignore=shutil.ignore_patterns("checkpoint"))
    return dest


def build_arch(manifest: Manifest) -> nn.Module:
    """The original architecture the bundle was cut from, freshly initialised.

    Build it under ``torch.device("meta")`` to trace or count it without allocating weights.
    """
    return build_model(
        manifest.arch.name,
        num_classes=manifest.num_classes,
        in_channels=manifest.input.shape[0],
        **manifest.arch.args,
    )


class HeadRunner(HeadCodec):
    """Device side on PyTorch: uint8 inputs to encoded bottleneck payloads (the checks and
    codecs are :class:`tandem.head.HeadCodec`'s, shared with the ONNX runtime's head)."""

    def __init__(
        self, encoder: BottleneckEncoder, manifest: Manifest, points: Sequence[RatePoint] = ()
    ) -> None:
        super().__init__(manifest, points)
        self.encoder = encoder.eval()

    @classmethod
    def from_bundle(cls, bundle: Path, adapter: Path | None = None) -> HeadRunner:
        """Load the encoder only: the tail's weights are never read.

        ``adapter`` is a PEFT-format LoRA directory for the encoder (a federation publishes
        them to ``head-adapters/<name>/<version>/``); it is merged into the weights, so the
        head then costs what it did without one. Raises ``tandem.adapters.AdapterError``
        when it is malformed or does not fit this encoder.
        """
        m = read_manifest(bundle)
        b = m.bottleneck
        encoder = BottleneckEncoder(m.input.shape[0], b.encoder, b.channels, b.widths)
        _load_into(encoder, _load_verified(bundle, m, HEAD_FILE, tensor_bytes(encoder)), "head")
        if adapter is not None:
            loaded = load_adapter(adapter, Path(adapter).parent.name, Path(adapter).name)
            try:
                merged = merged_state(encoder, loaded)
            except AdapterError as e:
                raise AdapterError(
                    f"{adapter} does not fit this bundle's head (head adapters live under "
                    f"head-adapters/, tail ones under adapters/): {e}"
                ) from None
            encoder.load_state_dict(merged, strict=False)
        return cls(encoder, m, load_rate_points(bundle, m))

    @torch.inference_mode()
    def features(self, x: np.ndarray, width: float, batch_size: int = 512) -> np.ndarray:
        """The float bottleneck tensors for uint8 inputs ``(N, C, H, W)`` at ``width``."""
        self.check_input(x)
        self.check_width(width)
        spec = self.manifest.input
        out = [
            self.encoder.encode(normalize(x[i : i + batch_size], spec.mean, spec.std), width)
            for i in range(0, len(x), batch_size)
        ]
        return torch.cat(out).numpy()


class TailRunner:
    """Cloud side: encoded payloads to logits."""

    def __init__(
        self,
        cloud_tail: CloudTail,
        manifest: Manifest,
        points: Sequence[RatePoint] = (),
        device: torch.device | None = None,
        template: nn.Module | None = None,
    ) -> None:
        self.device = torch.device("cpu") if device is None else device
        self.model = cloud_tail.to(self.device).eval()
        self.manifest = manifest
        # The tail's architecture on the meta device, for copies (see fresh_model).
        self.template = template
        self.points = list(points)
        b = manifest.bottleneck
        self.accepted = {tuple(shape) for shape in b.shapes.values()}
        self.max_elements = max(math.prod(shape) for shape in self.accepted)

    @classmethod
    def from_bundle(
        cls, bundle: Path, manifest: Manifest | None = None, device: torch.device | None = None
    ) -> TailRunner:
        """Rebuild decoder + tail from the manifest and load ``tail.safetensors`` only,
        onto ``device`` (default: the CPU).

        ``manifest`` is the bundle's, when the caller has read it already. The weight file's
        size is checked against the architecture before the file is read or a model is
        allocated, so a manifest claiming a huge model, or a huge file, costs nothing.
        """
        m = read_manifest(bundle) if manifest is None else manifest
        template = tail_template(bundle, m)
        state = _load_verified(bundle, m, TAIL_FILE, tail_bytes(m, template))
        return cls.from_state(m, state, load_rate_points(bundle, m), device, template)

    @classmethod
    def from_state(
        cls,
        manifest: Manifest,
        state: dict[str, torch.Tensor],
        points: Sequence[RatePoint] = (),
        device: torch.device | None = None,
        template: nn.Module | None = None,
    ) -> TailRunner:
        """Decoder + tail for ``manifest`` with the weights in ``state`` (a state dict).

        ``template`` is the tail on the meta device (:func:`tail_template`); a zoo bundle's
        is rebuilt from its manifest when not given, an exported one's must be.
        """
        if template is None:
            if manifest.tail_format == "exported":
                raise BundleError(f"{manifest.name}: an exported tail needs its program")
            template = _traced_tail(manifest)
        b = manifest.bottleneck
        decoder = BottleneckDecoder(b.channels, b.widths, b.decoder, b.cut_shape[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # an exported graph's pytree specs
            tail = copy.deepcopy(template).to_empty(device="cpu")
        cloud = CloudTail(decoder, tail)
        _load_into(cloud, state, "tail")
        return cls(cloud, manifest, points, device, template)

    def fresh_model(self) -> CloudTail:
        """A private copy of decoder + tail, on this runner's device, built from the weights
        in memory (not from disk, which may hold a newer version by now) and not deep-copied
        (which would copy hooks): for a LoRA to attach to, or an adapter to merge into."""
        state = self.model.state_dict()
        return TailRunner.from_state(self.manifest, state, (), self.device, self.template).model

    def unpack(self, payloads: Sequence[bytes], width: float | None = None) -> torch.Tensor:
        """Decode payloads into one batch, rejecting shapes the decoder was not trained for.

        Entropy-coded (v2) payloads carry no shape: each one's header names the sender's
        width (checked against ``width`` when given) and rate point, and the bundle gives
        the shape.
        """
        if payloads and all(entropy_codec.is_v2(p) for p in payloads):
            return torch.from_numpy(np.stack([self.decode_entropy(p, width) for p in payloads]))
        # Headers first: a payload whose shape the decoder cannot take is refused before any
        # of the batch is decompressed, so a hostile batch costs no more than a valid one.
        shapes = {codec.read_header(p, max_elements=self.max_elements).shape for p in payloads}
        if len(shapes) != 1 or next(iter(shapes)) not in self.accepted:
            raise ValueError(f"payload shapes {sorted(shapes)} not among {sorted(self.accepted)}")
        arrays = [codec.decode(p, max_elements=self.max_elements) for p in payloads]
        # The codec only ever yields finite values, so no NaN check is needed here.
        return torch.from_numpy(np.stack(arrays).astype(np.float32, copy=False))

    def decode_entropy(self, payload: bytes, width: float | None = None) -> np.ndarray:
        """The decoder's float input for one v2 payload. Its header names the sender's width
        and rate point; ``width``, when given, must be that width. CodecError for a payload
        that does not decode, names a width or point the bundle lacks, or disagrees."""
        widths = self.manifest.bottleneck.widths
        index = entropy_codec.width_index_of(payload)
        if index >= len(widths) or (width is not None and widths[index] != width):
            sent = widths[index] if index < len(widths) else f"index {index}"
            raise codec.CodecError(f"the payload was coded at width {sent}, not {width}")
        point = entropy_codec.point_of(payload)
        if point >= len(self.points):
            raise codec.CodecError(f"rate point {point} not in this bundle")
        c, h, w = self.manifest.bottleneck.shapes[str(widths[index])]
        return self.points[point].decode(payload, (c, h, w))

    @torch.inference_mode()
    def infer(self, payloads: Sequence[bytes], width: float | None = None) -> np.ndarray:
        """Logits ``(N, classes)`` for payloads that all have the same width (which
        entropy-coded payloads need stated). On a GPU the decoded batch is copied from
        page-locked memory, asynchronously."""
        return self.model(self.to_device(self.unpack(payloads, width))).cpu().numpy()

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """A decoded batch on the runner's device: on a GPU, copied from page-locked memory
        without waiting (the forward pass that follows queues behind the copy)."""
        if self.device.type != "cuda":
            return batch
        return batch.pin_memory().to(self.device, non_blocking=True)


def tail_bytes(manifest: Manifest, template: nn.Module) -> tuple[int, int]:
    """(bytes, count) of the tensors in ``manifest``'s decoder + tail (``template``, from
    :func:`tail_template`), computed on the meta device: what ``tail.safetensors`` must
    hold, known without allocating the model."""
    b = manifest.bottleneck
    with torch.device("meta"):
        decoder = BottleneckDecoder(b.channels, b.widths, b.decoder, b.cut_shape[0])
    (dec_bytes, dec_count), (tail, count) = tensor_bytes(decoder), tensor_bytes(template)
    return dec_bytes + tail, dec_count + count


def tail_template(bundle: Path, manifest: Manifest) -> nn.Module:
    """The bundle's tail on the meta device, shared (callers copy it): rebuilt from the
    architecture's name for a zoo bundle, or read from its hash-checked program for an
    exported one; either way once per process and architecture or program."""
    if manifest.tail_format == "zoo":
        return _traced_tail(manifest)

    def load() -> nn.Module:
        text = verified_bytes(bundle, manifest, PROGRAM_FILE, 2, MAX_PROGRAM_BYTES)
        try:
            return load_program(text)
        except ProgramError as exc:
            raise BundleError(f"{bundle}: {PROGRAM_FILE}: {exc}") from None

    return _cached("program:" + manifest.files[PROGRAM_FILE], load)


def _cached(key: str, make: Callable[[], nn.Module]) -> nn.Module:
    """The template kept under ``key``, made (under the lock: see :func:`_traced_tail`) the
    first time; only the last :data:`_TRACED_KEPT` are kept."""
    with _TRACE_LOCK:
        return lru_get(_TRACED, key, make, _TRACED_KEPT)


_TRACE_LOCK = threading.Lock()
_TRACED: OrderedDict[str, nn.Module] = OrderedDict()
_TRACED_KEPT = (
    16  # architectures; a repository fed manifests with ever new arguments must not grow it
)


def _traced_tail(manifest: Manifest) -> nn.Module:
    """The tail of ``manifest``'s architecture at its cut, on the meta device; traced once
    per process and architecture, and copied by every caller.

    Why once: torch.fx tracing patches ``nn.Module.__call__`` for the whole process while it
    runs, so a forward pass on another thread at that moment fails. Serving loads adapted
    copies and new bundle versions while worker threads compute; copying a traced template
    never traces. (The first bundle of a new architecture still traces, once.) On the meta
    device the whole architecture costs no memory.
    """
    # Everything the traced graph depends on, and nothing else (not the weights' hashes).
    key = json.dumps([manifest.arch.model_dump(), manifest.num_classes,
                      list(manifest.input.shape), manifest.cut])  # fmt: skip

    def trace() -> nn.Module:
        with torch.device("meta"):
            model = build_arch(manifest)
        return split_model(model, manifest.cut).tail

    return _cached(key, trace)


def load_full(bundle: Path) -> nn.Module | None:
    """The bundle's whole original model (the local fallback), or None if it has none (an
    exported bundle has none: its architecture cannot be rebuilt by name)."""
    m = read_manifest(bundle)
    if FULL_FILE not in m.files or m.tail_format == "exported":
        return None
    model = build_arch(m)
    _load_into(model, _load_verified(bundle, m, FULL_FILE, tensor_bytes(model)), "full model")
    return model.eval()


def bottleneck_shapes(channels: int, widths: list[float], spatial: tuple[int, int]) -> dict:
    """The (C, H, W) tensor sent at each width, keyed by the width as a string."""
    return {str(w): (width_channels(channels, w), *spatial) for w in widths}
