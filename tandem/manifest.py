"""A bundle's manifest, read and checked without PyTorch: what a device needs first.

:class:`Manifest` is the validated ``manifest.json`` (layout in :mod:`tandem.bundle`);
:func:`read_manifest` reads it bounded, :func:`verified_bytes` reads any bundle file checked
against the sha256 the manifest records, and :func:`load_rate_points` the entropy model's
tables. The weights, and everything that needs PyTorch, are :mod:`tandem.bundle`'s.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from tandem import codec, entropy_codec
from tandem.config import ArchConfig, BottleneckConfig, StrictModel, problems
from tandem.entropy_points import ENTROPY_FILE, RatePoint, points_from_bytes
from tandem.files import open_regular, read_regular
from tandem.widths import width_channels

MANIFEST = "manifest.json"
HEAD_FILE, TAIL_FILE, FULL_FILE = "head.safetensors", "tail.safetensors", "full.safetensors"
PROGRAM_FILE = "tail.program.json"
"""An exported tail's graph (:mod:`tandem.exported`), beside ``tail.safetensors``."""
MAX_MANIFEST_BYTES = 4 << 20
"""A manifest is a few KB (tens for a model with 20,000 labels); a larger one is refused unread."""
_CHUNK = 1 << 20  # weight files are hashed in pieces this big, never held whole to be hashed
# A safetensors file is 8 bytes, a JSON header, then the tensors' bytes; the header takes
# about 100 bytes per tensor, so this much per tensor (plus a margin) is generous.
HEADER_BYTES_PER_TENSOR = 512
HEADER_MARGIN = 64 << 10


class BundleError(ValueError):
    """A bundle is missing, malformed, or its files do not match their recorded hashes."""


class InputSpec(StrictModel):
    """What the head expects: uint8 images of ``shape`` (C, H, W), and how to normalise them."""

    shape: tuple[int, int, int]
    dtype: Literal["uint8"] = "uint8"
    mean: list[float]
    std: list[float]
    labels: list[str]


class BottleneckSpec(BottleneckConfig):
    """The bottleneck's configuration plus the tensor shapes it produces."""

    cut_shape: tuple[int, int, int]
    shapes: dict[str, tuple[int, int, int]] = Field(description="width -> (C, H, W) sent")


class CodecDefaults(StrictModel):
    """Codec settings a client uses unless told otherwise."""

    bits: int
    compress: bool = True


class TablePoint(StrictModel):
    """One measured operating point of the bundle.

    ``codec`` "quantize" is the quantise+zstd codec at ``bits``; "entropy" is rate point
    ``point`` (its β in ``beta``), range-coded, with the prior's own estimate of a sample's
    bits in ``entropy_bits`` (so the coder's overhead over it shows).
    """

    width: float
    codec: Literal["quantize", "entropy"] = "quantize"
    bits: int | None = None
    point: int | None = Field(default=None, ge=0)
    beta: float | None = None
    accuracy: float = Field(ge=0, le=1)
    bytes_per_sample: float = Field(ge=0)
    entropy_bits: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_codec(self) -> TablePoint:
        """A quantize point names its bits, an entropy point its rate point; not both."""
        if self.codec == "quantize" and (self.bits is None or self.point is not None):
            raise ValueError("a quantize point needs bits and no point")
        if self.codec == "entropy" and (self.point is None or self.bits is not None):
            raise ValueError("an entropy point needs a point and no bits")
        return self


class EntropySpec(StrictModel):
    """The rate points of the learned entropy model; their tables are in entropy.safetensors."""

    betas: list[float] = Field(min_length=1, max_length=entropy_codec.MAX_POINTS)


class Manifest(StrictModel):
    """The validated content of ``manifest.json``."""

    format_version: Literal[1, 2] = 1
    name: str
    version: str
    arch: ArchConfig
    tail_format: Literal["zoo", "exported"] = Field(
        default="zoo",
        description="zoo: the cloud rebuilds the tail from the architecture's name; exported: "
        "from tail.program.json (a user model, whose name the zoo does not know)",
    )
    num_classes: int = Field(ge=1)
    cut: str
    input: InputSpec
    bottleneck: BottleneckSpec
    codec: CodecDefaults
    entropy: EntropySpec | None = None
    teacher_accuracy: float | None = Field(default=None, ge=0, le=1)
    teacher_flops: int = Field(gt=0)
    head_flops: int = Field(ge=0, description="encoder FLOPs per sample at full width")
    table: list[TablePoint] = Field(default_factory=list)
    profile: list[dict[str, Any]] = Field(default_factory=list)
    files: dict[str, str] = Field(description="file name -> sha256")
    recipe: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        """Cross-field checks: a manifest that passes describes one coherent model."""
        inp, b = self.input, self.bottleneck
        if not len(inp.mean) == len(inp.std) == inp.shape[0]:
            raise ValueError("input.mean and input.std need one value per input channel")
        if len(inp.labels) != self.num_classes:
            raise ValueError("input.labels needs one name per class")
        expected = {str(w): width_channels(b.channels, w) for w in b.widths}
        if {k: s[0] for k, s in b.shapes.items()} != expected:
            raise ValueError(f"bottleneck.shapes must give {expected} channels per width")
        for bits in [self.codec.bits, *(p.bits for p in self.table if p.bits is not None)]:
            if bits not in codec.SUPPORTED_BITS:
                raise ValueError(f"bits {bits} not among {codec.SUPPORTED_BITS}")
        if any(p.width not in b.widths for p in self.table):
            raise ValueError("the table names a width the bottleneck was not trained for")
        if (self.tail_format == "exported") != (PROGRAM_FILE in self.files):
            raise ValueError(f"an exported tail needs {PROGRAM_FILE} in files, and only it does")
        if (self.format_version == 2) != (self.entropy is not None):
            raise ValueError("format_version 2 goes with an entropy section, and only with one")
        points = len(self.entropy.betas) if self.entropy is not None else 0
        if any(p.point is not None and p.point >= points for p in self.table):
            raise ValueError(f"the table names a rate point beyond the {points} the bundle has")
        return self


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(bundle: Path) -> Manifest:
    """Read and validate a bundle's manifest; a :class:`BundleError` says why in one line.

    Only a regular file of at most :data:`MAX_MANIFEST_BYTES` is read (never a FIFO).
    """
    path = Path(bundle) / MANIFEST
    try:
        data = read_regular(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise BundleError(f"{bundle} is not a bundle: no {MANIFEST}") from None
    except OSError as exc:
        raise BundleError(f"{path} is unreadable: {exc}") from None
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise BundleError(f"{path} is invalid: {problems(exc, shown=3)}") from None


def verified_bytes(
    bundle: Path, manifest: Manifest, name: str, low: int, high: int | None
) -> bytes:
    """The bytes of file ``name``, checked against the manifest's sha256.

    A file whose size is outside ``low..high`` is refused before any of it is read. The file
    is hashed as a stream, in chunks, so a wrong file is never held whole; only a match is
    then read, from the same open file, which must not have changed meanwhile.
    """
    path = Path(bundle) / name
    digest = manifest.files.get(name)
    if digest is None:
        raise BundleError(f"{bundle}: {name} is missing")
    try:
        with open_regular(path) as f:
            before = os.fstat(f.fileno())
            if before.st_size < low or (high is not None and before.st_size > high):
                raise BundleError(
                    f"{bundle}: {name} has {before.st_size} bytes; the manifest allows "
                    f"{low}..{high}"
                )
            hasher = hashlib.sha256()
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                hasher.update(chunk)
            if hasher.hexdigest() != digest:
                raise BundleError(f"{bundle}: {name} does not match its sha256 in the manifest")
            f.seek(0)
            data = f.read(before.st_size + 1)
            after = os.fstat(f.fileno())
    except FileNotFoundError:
        raise BundleError(f"{bundle}: {name} is missing") from None
    except OSError as exc:  # not a regular file, unreadable
        raise BundleError(f"{bundle}: {name} is unreadable: {exc}") from None
    if len(data) != before.st_size or (after.st_size, after.st_mtime_ns) != (
        before.st_size,
        before.st_mtime_ns,
    ):
        raise BundleError(f"{bundle}: {name} changed while it was read")
    return data


def load_rate_points(bundle: Path, manifest: Manifest) -> list[RatePoint]:
    """The bundle's rate points, hash-checked ([] for a bundle without an entropy model).

    The file's size is bounded before it is read: every point's tables at the coder's
    longest alphabet for each bottleneck channel, plus the safetensors header.
    """
    if manifest.entropy is None:
        return []
    count, channels = len(manifest.entropy.betas), manifest.bottleneck.channels
    per_point = channels * (4 * entropy_codec.MAX_TABLE_LENGTH + 16)
    high = 8 + HEADER_MARGIN + count * (per_point + 5 * HEADER_BYTES_PER_TENSOR)
    data = verified_bytes(bundle, manifest, ENTROPY_FILE, 8, high)
    try:
        points = points_from_bytes(data, count)
    except ValueError as exc:
        raise BundleError(f"{bundle}: {ENTROPY_FILE} {exc}") from None
    if any(len(p.tables.offset) != channels for p in points):
        raise BundleError(f"{bundle}: {ENTROPY_FILE} does not have {channels} channels a point")
    return points
