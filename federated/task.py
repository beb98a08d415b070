"""What a client computes: its model inputs, local LoRA training, and accuracy.

A client holds raw images. When only decoder + tail adapt, its frozen head runs once over
them, and the features go through the codec and back (``tandem.codec`` at the bundle's width
and bits, or the entropy codec at a rate point: decoded, rounded symbols), so training sees
exactly the tensors the cloud decodes from the wire. When the head adapts too,
the images themselves (normalised) are the inputs of a :class:`EndToEnd`, which runs the
whole path every step with the codec's rounding in it.

Training and evaluation run on the device the caller gives (the model already there); the
inputs stay on the CPU and go over a batch at a time, and what is returned is on the CPU.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from tandem import codec
from tandem.bottleneck import BottleneckEncoder, CloudTail, fake_quantize
from tandem.bundle import HeadRunner, TailRunner
from tandem.data import DataSet, load_data, normalize
from tandem.device import CPU
from tandem.federated.domains import apply_domain
from tandem.federated.partition import Scheme, partition_rows

EVAL_BATCH = 256


@dataclass(frozen=True)
class Features:
    """Model inputs ``z`` (float32, N x C x H x W) and their labels ``y``: decoded wire
    features for a decoder + tail, normalised images for a :class:`EndToEnd`."""

    z: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Wire:
    """How features cross the wire: the bundle, its width, and its bits or rate point."""

    bundle: str
    width: float = 0.0  # 0: the widest trained width
    bits: int = 0  # 0: the bundle's default
    point: int = -1  # >= 0: this rate point of the entropy codec instead of bits


@functools.lru_cache(maxsize=4)
def _head(bundle: str) -> HeadRunner:
    return HeadRunner.from_bundle(Path(bundle))


@functools.lru_cache(maxsize=2)
def _data(spec: str) -> DataSet:
    return load_data(spec)


def resolved(wire: Wire) -> tuple[float, int]:
    """The (width, bits) that ``wire`` means for its bundle."""
    m = _head(wire.bundle).manifest
    return (wire.width or max(m.bottleneck.widths)), (wire.bits or m.codec.bits)


def features(wire: Wire, x: np.ndarray, y: np.ndarray, head: HeadRunner | None = None) -> Features:
    """Images ``x`` through ``head`` (default: the bundle's) and the codec, as the cloud
    receives them."""
    head = _head(wire.bundle) if head is None else head
    width, bits = resolved(wire)
    if wire.point >= 0:
        rate = head.rate_point(wire.point)
        shape = head.manifest.bottleneck.shapes[str(width)]
        payloads = head.encode_entropy(x, width, wire.point) if len(x) else []
        decoded = [rate.decode(p, shape) for p in payloads]
    else:
        decoded = [codec.decode(p) for p in (head.encode(x, width, bits) if len(x) else [])]
    z = np.stack(decoded) if decoded else np.zeros((0, 1, 1, 1))
    return Features(torch.from_numpy(z.astype(np.float32)), torch.from_numpy(y.astype(np.int64)))


@dataclass(frozen=True)
class ClientSpec:
    """Which data a client holds: its partition, domain and sample caps."""

    data: str
    partition: int
    num_partitions: int
    domain: str
    scheme: Scheme = "dirichlet"
    dirichlet_alpha: float = 0.5
    max_samples: int = 1000
    eval_samples: int = 300
    seed: int = 0


HOLDOUT = 0.2  # of a client's rows, kept back as its own test data


@functools.lru_cache(maxsize=16)
def client_inputs(wire: Wire, spec: ClientSpec, images: bool = False) -> tuple[Features, Features]:
    """A client's (train, test) model inputs: its partition of the training split, seen
    through its own domain, with a seeded fifth (at most ``eval_samples``) held out for
    testing, so its test data has its own label mix as well as its own domain. Wire features
    by default; normalised images, for a :class:`EndToEnd`, with ``images``."""
    data = _data(spec.data)
    rows = partition_rows(
        data.train.y, spec.num_partitions, spec.partition,
        scheme=spec.scheme, alpha=spec.dirichlet_alpha, seed=spec.seed,
    )  # fmt: skip
    seed = spec.seed * 1000 + spec.partition
    rows = np.random.default_rng(seed).permutation(rows)
    held = min(spec.eval_samples, max(1, int(len(rows) * HOLDOUT)))
    # Only this client's rows are read: an image folder's split stays on disk.
    x = apply_domain(spec.domain, data.train.take(rows[: held + spec.max_samples]), seed)
    y = data.train.y[rows[: held + spec.max_samples]]
    inputs = functools.partial(normalized, wire) if images else functools.partial(features, wire)
    return inputs(x[held:], y[held:]), inputs(x[:held], y[:held])


def normalized(wire: Wire, x: np.ndarray, y: np.ndarray) -> Features:
    """Images ``x`` normalised as the bundle's head expects them."""
    spec = _head(wire.bundle).manifest.input
    return Features(normalize(x, spec.mean, spec.std), torch.from_numpy(y.astype(np.int64)))


def domain_inputs(
    data_spec: str, domain: str, samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``samples`` test images seen through ``domain``, and their labels: what a
    device in that domain would send."""
    test = _data(data_spec).test
    first = np.arange(min(samples, len(test)))
    return apply_domain(domain, test.take(first), seed + 7919), test.y[first]


@functools.lru_cache(maxsize=4)
def _tail(bundle: str) -> TailRunner:
    return TailRunner.from_bundle(Path(bundle))


def tail_model(bundle: str) -> CloudTail:
    """A fresh decoder + tail of ``bundle`` (its own copy: callers attach LoRA to it or merge
    into it). The bundle is read and its hashes checked once per process, not per round."""
    return _tail(bundle).fresh_model()


def head_model(bundle: str) -> BottleneckEncoder:
    """A fresh copy of ``bundle``'s head (encoder), for a LoRA or a merge."""
    return copy.deepcopy(_head(bundle).encoder)


def head_runner(bundle: str, encoder: BottleneckEncoder) -> HeadRunner:
    """``bundle``'s head runner with ``encoder`` (an adapted copy) in place of its own."""
    return HeadRunner(encoder, _head(bundle).manifest)


class EndToEnd(nn.Module):
    """The whole path one input takes: head, the wire's rounding, decoder and tail.

    A head adapter trains through it. The rounding is the codec's per-channel quantization
    with straight-through gradients (``tandem.bottleneck.fake_quantize``), so the head learns
    under the error the wire adds. Module paths are ``head.*``, ``decoder.*`` and ``tail.*``:
    the same as :func:`tail_model`'s for the cloud side.
    """

    def __init__(self, head: BottleneckEncoder, cloud: CloudTail, width: float, bits: int) -> None:
        super().__init__()
        self.head = head
        self.decoder = cloud.decoder
        self.tail = cloud.tail
        self.width = width
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for normalised images."""
        z = fake_quantize(self.head.encode(x, self.width), self.bits)
        return self.tail(self.decoder.decode(z))


def model_for(wire: Wire, head: bool) -> nn.Module:
    """A fresh model to attach LoRA to: an :class:`EndToEnd` of ``wire``'s bundle at its width
    and bits when the ``head`` adapts too, else its decoder + tail."""
    if not head:
        return tail_model(wire.bundle)
    return EndToEnd(head_model(wire.bundle), tail_model(wire.bundle), *resolved(wire))


@torch.inference_mode()
def predictions(model: nn.Module, data: Features, device: torch.device = CPU) -> torch.Tensor:
    """The predicted class of every sample, by ``model`` on ``device`` (where it is)."""
    model.eval()
    out = [
        model(data.z[i : i + EVAL_BATCH].to(device)).argmax(1).cpu()
        for i in range(0, len(data), EVAL_BATCH)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def accuracy(model: nn.Module, data: Features, device: torch.device = CPU) -> float:
    """Top-1 accuracy of ``model`` (on ``device``) on ``data`` (0 for no data)."""
    if not len(data):
        return 0.0
    return float((predictions(model, data, device) == data.y).float().mean())


@dataclass(frozen=True)
class TrainSettings:
    """Local training: epochs, learning rate, batch size, FedProx's mu, and the seed."""

    epochs: int
    lr: float
    batch_size: int
    proximal_mu: float = 0.0
    seed: int = 0


def train(
    model: PeftModel, data: Features, settings: TrainSettings, device: torch.device = CPU
) -> float:
    """Train the adapter's trainable weights on ``data`` (on ``device``, where the model
    is); returns the mean loss of the last epoch. With ``proximal_mu`` > 0 the loss adds
    FedProx's (mu / 2) * ||w - w_start||^2, which keeps a client on skewed data from drifting
    far from the global adapter."""
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed)
    # Eval mode throughout: batch norm must keep using (and not update) the frozen running
    # statistics the cloud serves with; LoRA has no dropout here, so nothing else changes.
    model.eval()
    last = 0.0
    for _ in range(settings.epochs):
        order = torch.randperm(len(data), generator=gen)
        total = 0.0
        for i in range(0, len(data), settings.batch_size):
            idx = order[i : i + settings.batch_size]
            z, y = data.z[idx].to(device), data.y[idx].to(device)
            loss = F.cross_entropy(model(z), y)
            if settings.proximal_mu:
                drift = sum(((p - s) ** 2).sum() for p, s in zip(params, start, strict=True))
                loss = loss + settings.proximal_mu / 2 * drift
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        last = total / max(1, len(data))
    return last
