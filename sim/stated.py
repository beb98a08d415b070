"""Simulating a model nobody trained here: measured compute plus stated, sourced rates.

An **architecture profile** (``tandem profile --arch resnet50 --input 3x224x224 --out FILE``)
times a zoo model with random weights on this machine, one torch thread: the whole model, and
the head at every cut, with each cut's FLOPs and tensor size. Compute time does not depend
on the weights, so no training is needed for it.

What does depend on training (the bytes a learned bottleneck sends, and the accuracy at those
bytes) a scenario **states**, each figure with its source (a paper's table), in its
``model:`` block::

    model:
      arch_profile: resnet50-224          # shipped name or JSON file
      accuracy: {value: 0.7615, source: "..."}
      cloud_speedup: {value: 40, source: "..."}
      split: {cut: layer1, bytes: 4300, accuracy: 0.7508, source: "..."}
      offload:                            # jpeg and webp, each optional
        jpeg: {bytes: 9000, accuracy: 0.75, source: "..."}

(The numbers above show the form only.) Without ``strategies`` such a scenario compares local
inference, the raw input, each stated input codec and the split; its ``split`` point is
``{width: 1.0, point: 0}``, the one row of the profile it makes.

:func:`stated_profile` turns the two into the :class:`BundleProfile` the simulator runs: the
device runs the head up to the split's cut (the teacher's own layers: a learned encoder in
their place is usually lighter, so this errs against splitting) and sends the stated bytes;
the cloud runs the tail (its FLOP share of the whole model's time), and the whole model for
offloading, ``cloud_speedup`` times faster than this machine's one thread; offloading sends
each stated input codec's bytes.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tandem.config import settings_error
from tandem.sim.profiles import BundleProfile, Cost, InputCost, TableRow, request_overhead

if TYPE_CHECKING:  # reading a profile needs no torch of its own
    from tandem.profile import CutProfile

STATED_WIDTH = 1.0
"""The one width of a stated split: there is no slimmable bottleneck to choose among."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ArchCut(_Strict):
    """One cut of an architecture profile."""

    name: str
    shape: list[int]
    raw_bytes: int = Field(ge=0)
    head_flops: int = Field(ge=0)
    tail_flops: int = Field(ge=0)
    head_ms: float = Field(ge=0, description="head time for one input, this machine")


class ArchProfile(_Strict):
    """A zoo architecture's compute on this machine, without trained weights."""

    arch: str
    input: list[int] = Field(min_length=3, max_length=3, description="C, H, W")
    num_classes: int = Field(ge=1)
    machine: str
    threads: int = Field(ge=1)
    full_ms: float = Field(gt=0, description="the whole model on one input")
    cuts: list[ArchCut] = Field(min_length=1)

    def cut(self, name: str) -> ArchCut:
        """The cut named ``name``; ValueError naming the choices otherwise."""
        for cut in self.cuts:
            if cut.name == name:
                return cut
        raise ValueError(f"no cut {name!r} in the {self.arch} profile; cuts: "
                         f"{', '.join(c.name for c in self.cuts)}")  # fmt: skip

    def save(self, path: Path) -> None:
        """Write the profile as JSON."""
        Path(path).write_text(self.model_dump_json(indent=1) + "\n")


def arch_profile(
    arch: str,
    input_shape: list[int],
    num_classes: int,
    cuts: list[CutProfile],
    full_ms: float,
    threads: int,
) -> ArchProfile:
    """The profile of ``tandem profile --arch`` from its measured cuts (timed at batch 1)."""
    return ArchProfile(
        arch=arch,
        input=list(input_shape),
        num_classes=num_classes,
        machine=f"{platform.machine()} {platform.processor() or platform.system()}".strip(),
        threads=threads,
        full_ms=full_ms,
        cuts=[
            ArchCut(
                name=c.name, shape=list(c.shape), raw_bytes=c.raw_bytes, head_flops=c.head_flops,
                tail_flops=c.tail_flops, head_ms=c.head_latency_ms or 0.0,
            )
            for c in cuts
        ],
    )  # fmt: skip


class Stated(_Strict):
    """A figure taken from elsewhere, with where it comes from."""

    value: float = Field(gt=0)
    source: str = Field(min_length=1)


class StatedCodec(_Strict):
    """Bytes per sample and the accuracy at them, for an input codec or a split, sourced."""

    bytes: float = Field(gt=0)
    accuracy: float = Field(gt=0, le=1)
    source: str = Field(min_length=1)


class StatedSplit(StatedCodec):
    """The split: where the model is cut, what crosses, and the accuracy it keeps."""

    cut: str = Field(min_length=1)


class StatedModel(_Strict):
    """A scenario's ``model:`` block (see the module docstring)."""

    arch_profile: str = Field(min_length=1, description="shipped name or JSON file")
    accuracy: Stated
    cloud_speedup: Stated
    split: StatedSplit
    offload: dict[Literal["jpeg", "webp"], StatedCodec] = Field(default_factory=dict)

    def sources(self) -> list[str]:
        """Each stated figure and its source, one line each, for the report."""
        lines = [
            f"local accuracy {self.accuracy.value:g}: {self.accuracy.source}",
            f"cloud {self.cloud_speedup.value:g}x this machine's one thread: "
            f"{self.cloud_speedup.source}",
            f"split at {self.split.cut}, {self.split.bytes:g} B, accuracy "
            f"{self.split.accuracy:g}: {self.split.source}",
        ]
        lines += [
            f"offload {name}: {c.bytes:g} B, accuracy {c.accuracy:g}: {c.source}"
            for name, c in self.offload.items()
        ]
        return lines


def load_arch_profile(path: Path) -> ArchProfile:
    """Read an architecture profile; ValueError with one line per problem otherwise."""
    try:
        return ArchProfile.model_validate(json.loads(Path(path).read_text()))
    except ValidationError as exc:
        raise settings_error(f"architecture profile {path}", exc) from None
    except ValueError as exc:  # JSON syntax
        raise ValueError(f"model.arch_profile: cannot read {path}: {exc}") from None


def stated_profile(model: StatedModel, arch: ArchProfile) -> BundleProfile:
    """The simulator's profile for ``model``'s stated figures on ``arch``'s measured compute."""
    cut = arch.cut(model.split.cut)
    speedup = model.cloud_speedup.value
    # The tail's share of the whole model's time is taken as its share of the FLOPs: the
    # difference of two timings can come out negative on a busy machine, and the cloud's
    # time is a stated speedup of this one's anyway.
    tail_ms = arch.full_ms * cut.tail_flops / max(cut.head_flops + cut.tail_flops, 1)
    channels, height, width = arch.input
    return BundleProfile(
        bundle=f"{arch.arch} (stated figures, no trained bundle)",
        version="-",
        machine=arch.machine,
        head_ms={STATED_WIDTH: cut.head_ms},
        full_ms=arch.full_ms,
        tail={STATED_WIDTH: Cost(fixed_ms=0.0, per_input_ms=tail_ms / speedup)},
        full_batch=Cost(fixed_ms=0.0, per_input_ms=arch.full_ms / speedup),
        input_bytes=float(channels * height * width),  # uint8 pixels
        png_bytes=None,  # not stated: offload-png is refused rather than guessed
        full_accuracy=model.accuracy.value,
        table=[
            TableRow(
                width=STATED_WIDTH,
                point=0,
                accuracy=model.split.accuracy,
                bytes_per_sample=model.split.bytes,
            )
        ],
        request_overhead_bytes=float(request_overhead(bytes(round(model.split.bytes)))),
        input_codecs={
            name: InputCost(bytes_per_sample=c.bytes, accuracy=c.accuracy)
            for name, c in model.offload.items()
        },
    )
