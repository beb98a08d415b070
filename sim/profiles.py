"""Compute profiles: what a bundle costs on this machine, and on named classes of device.

:func:`measure_bundle` times a bundle's parts here: head + encoder + codec per input at each
width, the whole model per input (the local fallback), and the cloud's work per batch (decode
+ decoder + tail at each width, the whole model for offloading) fitted as ``fixed + per_input
x n`` over batch sizes. ``tandem profile --bundle DIR --out FILE`` writes it as JSON.

A device class scales the measured device-side times by a factor and adds the power figures
the energy model needs. The factors and powers of the shipped classes are assumptions, stated
in :data:`DEVICE_CLASSES`, not measurements of those devices.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tandem.sim.batching import BatchCost, CloudModel
from tandem.sim.des import RESPONSE_BYTES, DeviceProfile

BATCHES = (1, 4, 16, 32, 64)
TYPICAL_COUNT = 10_000
"""A stream message's seq and answers_read, as a daemon some thousands of inputs into its run
sends them: two varint bytes each (three from 16,384 on)."""


class Strict(BaseModel):
    """No unknown keys: a typo in a profile file is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Cost(Strict):
    """A batch of ``n`` takes ``fixed_ms + per_input_ms * n``."""

    fixed_ms: float = Field(ge=0)
    per_input_ms: float = Field(ge=0)

    def batch(self) -> BatchCost:
        """The simulator's form."""
        return BatchCost(self.fixed_ms, self.per_input_ms)


class TableRow(Strict):
    """One measured operating point of the bundle: a width, and either the quantise+zstd
    codec at ``bits`` or rate ``point`` of the entropy model, with the accuracy and mean
    codec bytes per sample that ``tandem eval`` measured."""

    width: float = Field(gt=0, le=1)
    bits: int | None = Field(default=None, ge=1)
    point: int | None = Field(default=None, ge=0)
    accuracy: float = Field(ge=0, le=1)
    bytes_per_sample: float = Field(ge=0)

    @model_validator(mode="after")
    def _one_codec(self) -> TableRow:
        if (self.bits is None) == (self.point is None):
            raise ValueError("a table row names bits or a rate point, exactly one")
        return self

    def key(self) -> tuple[float, int | None, int | None]:
        """(width, bits, point): what a policy decision names."""
        return (self.width, self.bits, self.point)

    def label(self) -> str:
        """``width/bits``, or ``width/pPOINT`` for a rate point."""
        codec = f"{self.bits}" if self.bits is not None else f"p{self.point}"
        return f"{self.width:g}/{codec}"

    def policy_row(self, overhead_bytes: float) -> dict[str, object]:
        """The row as :meth:`SplitPolicy.from_table` reads it, with ``overhead_bytes`` (what
        crosses the link besides the codec's bytes) added to its size."""
        return {
            **self.model_dump(),
            "codec": "quantize" if self.point is None else "entropy",
            "bytes_per_sample": self.bytes_per_sample + overhead_bytes,
        }


class InputCost(Strict):
    """Sending the input through a lossy codec: its mean bytes and the accuracy it keeps."""

    bytes_per_sample: float = Field(gt=0)
    accuracy: float = Field(ge=0, le=1)


class BundleProfile(Strict):
    """A bundle's measured costs on one machine (see the module docstring)."""

    bundle: str
    version: str
    machine: str
    head_ms: dict[float, float]
    full_ms: float = Field(gt=0)
    tail: dict[float, Cost]
    full_batch: Cost
    input_bytes: float = Field(gt=0)
    png_bytes: float | None = Field(
        default=None, gt=0, description="PNG-coded input, when measured (None: not offered)"
    )
    input_codecs: dict[str, InputCost] = Field(
        default_factory=dict, description="lossy input codecs for offloading, by name"
    )
    full_accuracy: float = Field(ge=0, le=1)
    table: list[TableRow]
    request_overhead_bytes: float = Field(gt=0, description="protobuf around the payload")
    frame_overhead_bytes: float = Field(
        0.0, ge=0, description="HTTP/2 and gRPC framing per request up, measured by calibrate"
    )
    response_bytes: float | None = Field(
        None, gt=0, description="socket bytes per answer down, measured by calibrate"
    )
    send_overhead_ms: float = Field(0.0, ge=0, description="edge software per request sent")

    def wire_overhead_bytes(self) -> float:
        """Bytes a request carries up besides its payload: protobuf, HTTP/2 and gRPC."""
        return self.request_overhead_bytes + self.frame_overhead_bytes

    def answer_bytes(self) -> float:
        """Bytes an answer carries down: as calibration counted them at the socket, when it
        did, else the simulator's estimate."""
        return self.response_bytes or RESPONSE_BYTES

    def save(self, path: Path) -> None:
        """Write the profile as JSON."""
        path.write_text(self.model_dump_json(indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> BundleProfile:
        """Read a profile written by :meth:`save` (or by ``tandem profile --bundle``)."""
        return cls.model_validate(json.loads(Path(path).read_text()))

    def cloud(self, workers: int = 1, max_batch: int = 32, max_delay_ms: float = 2.0) -> CloudModel:
        """The cloud side for the simulator, batching as ``tandem cloud serve`` is told to."""
        tail = {w: c.batch() for w, c in self.tail.items()}
        return CloudModel(tail, self.full_batch.batch(), workers, max_batch, max_delay_ms)


class DeviceClass(Strict):
    """A class of device: its compute time relative to this machine, and its power draw."""

    name: str
    factor: float = Field(gt=0, description="device compute time / this machine's")
    compute_w: float = Field(ge=0)
    tx_w: float = Field(ge=0)
    rx_w: float = Field(ge=0)
    basis: str = Field(description="where the numbers come from")

    def device(self, profile: BundleProfile) -> DeviceProfile:
        """The simulator's device profile: the bundle's device-side times, scaled."""
        return DeviceProfile(
            self.name,
            {w: ms * self.factor for w, ms in profile.head_ms.items()},
            profile.full_ms * self.factor,
            self.compute_w,
            self.tx_w,
            self.rx_w,
            profile.send_overhead_ms * self.factor,
        )


# Radio powers are an LTE modem's, active, from the ballpark of published measurements of
# phones (about 1-2.5 W sending, about 1 W receiving); they are the same for every class.
DEVICE_CLASSES = {
    c.name: c
    for c in (
        DeviceClass(
            name="host", factor=1.0, compute_w=15.0, tx_w=2.0, rx_w=1.2,
            basis="this machine, measured; 15 W is an assumed share of a server CPU",
        ),
        DeviceClass(
            name="rpi4", factor=4.2, compute_w=4.0, tx_w=2.0, rx_w=1.2,
            basis="ResNet-50 at 224x224, fp32: 487 ms on a Raspberry Pi 4 (4x Cortex-A72 at "
            "1.5 GHz, 4 threads, ncnn's benchmark/README.md) against 117 ms on one thread "
            "here (tandem profile --arch resnet50); the same README's 1.8 GHz Pi 4 gives 263 ms "
            "on 4 threads and 534 ms on one (2.2x and 4.6x). About 4 W under load (assumed)",
        ),
        DeviceClass(
            name="jetson-nano", factor=0.7, compute_w=7.5, tx_w=2.0, rx_w=1.2,
            basis="ResNet-50 at 224x224: 81.7 ms in PyTorch fp16 on a Jetson Nano "
            "(torch2trt's benchmarks/JETSON_NANO.md; 29.8 ms with TensorRT) against 117 ms on "
            "one thread here. 5-10 W power modes (NVIDIA's)",
        ),
    )
}  # fmt: skip


def device_class(name: str) -> DeviceClass:
    """A shipped class by name; ValueError naming the choices otherwise."""
    try:
        return DEVICE_CLASSES[name]
    except KeyError:
        choices = list(DEVICE_CLASSES)
        raise ValueError(f"unknown device class {name!r}; choose from {choices}") from None


# ------------------------------------------------------------------------------- measuring


def measure_bundle(bundle: Path, x: np.ndarray, repeats: int = 25) -> BundleProfile:
    """Time ``bundle``'s parts on this machine with inputs ``x`` (uint8, N >= 64), one torch
    thread, as ``tandem cloud serve --torch-threads 1`` and a single-core device run them."""
    import torch

    from tandem.bundle import HeadRunner, TailRunner, load_full
    from tandem.data import normalize
    from tandem.evaluate import input_baselines

    torch.set_num_threads(1)
    head, tail, full = (
        HeadRunner.from_bundle(bundle),
        TailRunner.from_bundle(bundle),
        load_full(bundle),
    )
    if full is None:
        raise ValueError(f"{bundle} has no full model to profile")
    m = head.manifest
    spec = m.input

    @torch.inference_mode()
    def run_full(batch: np.ndarray) -> object:
        return full(normalize(batch, spec.mean, spec.std))

    head_ms, tail_cost, overheads = {}, {}, []
    for w in m.bottleneck.widths:
        head_ms[w] = _median_ms(partial(head.encode, x[:1], w, m.codec.bits), repeats)
        payloads = head.encode(x[: max(BATCHES)], w, m.codec.bits)
        tail_cost[w] = _fit(partial(_first, tail.infer, payloads), repeats)
        overheads += [request_overhead(p) for p in payloads]
    baselines = input_baselines(x[:256])
    return BundleProfile(
        bundle=m.name,
        version=m.version,
        machine=f"{platform.machine()} {platform.processor() or platform.system()}".strip(),
        head_ms=head_ms,
        full_ms=_median_ms(lambda: run_full(x[:1]), repeats),
        tail=tail_cost,
        full_batch=_fit(lambda n: run_full(x[:n]), repeats),
        input_bytes=baselines["raw"],
        png_bytes=baselines["png"],
        full_accuracy=m.teacher_accuracy or 0.0,
        table=[
            TableRow(
                width=p.width,
                bits=p.bits if p.codec == "quantize" else None,
                point=p.point if p.codec == "entropy" else None,
                accuracy=p.accuracy,
                bytes_per_sample=p.bytes_per_sample,
            )
            for p in m.table
        ],
        request_overhead_bytes=float(np.mean(overheads)),
    )  # fmt: skip


def request_overhead(payload: bytes) -> int:
    """Bytes a request adds around ``payload`` on the daemon's stream: its context number, seq
    and ``answers_read`` (:data:`TYPICAL_COUNT`), and the payload's own tag and length. The
    context's definition, once per stream and setting, is left out."""
    from tandem.protocol import bare_message
    from tandem.wire.v1 import split_inference_pb2 as pb

    message = bare_message(pb.InferRequest(payload=payload), 1, TYPICAL_COUNT, TYPICAL_COUNT)
    return message.ByteSize() - len(payload)


def _first(run: Callable[[list[bytes]], object], payloads: list[bytes], n: int) -> object:
    return run(payloads[:n])


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _fit(run: Callable[[int], object], repeats: int) -> Cost:
    """Least squares of batch time on batch size over :data:`BATCHES`."""
    ms = [_median_ms(partial(run, n), repeats) for n in BATCHES]
    slope, intercept = np.polyfit(BATCHES, ms, 1)
    return Cost(fixed_ms=max(0.0, float(intercept)), per_input_ms=max(0.0, float(slope)))
