"""Distillation recipes: train a teacher, then a slimmable bottleneck in two stages.

1. **Teacher.** Trained from scratch with cross-entropy, or loaded from a checkpoint.
2. **Head distillation.** The encoder and decoder learn to reproduce the frozen teacher's
   features at the cut (MSE), every width trained together by the sandwich rule.
3. **Fine-tuning.** Encoder, decoder and tail learn from labels and the teacher's logits
   (cross-entropy + KL), through the codec's quantization at randomly drawn bit depths, so
   that 8-, 4- and 2-bit transmission keep their accuracy.

With rate points (``rate.betas``, :mod:`tandem.entropy`), stage 2 trains the encoder with a
learned prior per β: feature distortion + β · bits per input pixel, through additive uniform
noise (and, drawn as one more point, the plain features that the quantise+zstd codec sends).
Stage 3 then freezes encoder and priors, which the exported tables describe, and fine-tunes
decoder and tail on what the wire delivers: the rounded, coded features of each point, or
the codec's quantization at a drawn bit depth. With ``rate.end_to_end`` stage 3 trains the
encoder, gains and priors too, on the task loss + β · bits per input pixel: the decoder sees
the symbols rounded (straight through), the rate is the noisy estimate.

Every phase checkpoints after each epoch (see :mod:`tandem.checkpoint`), and its random
draws come from a generator seeded by (seed, phase, epoch), so a resumed run retraces the
uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import pickle
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from tandem.bottleneck import (
    BottleneckEncoder,
    CloudTail,
    build_bottleneck,
    fake_quantize,
)
from tandem.checkpoint import Checkpointer
from tandem.config import OptimConfig, Recipe, RecipeError, TeacherConfig
from tandem.data import Batch, DataSet, Split, normalize, normalize_tensor, split_stats
from tandem.device import CPU, Precision, autocast, grad_scaler
from tandem.entropy import RatePoints
from tandem.models import build_model
from tandem.progress import bar as progress_bar
from tandem.split import split_model

log = logging.getLogger(__name__)

# Inputs over which the teacher's feature variance (the relative distortion's unit) is taken.
# Not part of a checkpoint's fingerprint: changing it changes the loss a resumed run continues.
VARIANCE_SAMPLE = 2048


BatchLoss = Callable[[Batch, torch.Generator], torch.Tensor]
# Reads the training split in the given batches of row indices, normalised, in that order.
Reader = Callable[[list[torch.Tensor]], Iterator[Batch]]


@dataclass
class DistilledModels:
    """The result of a recipe: the teacher, and the student's two sides."""

    teacher: nn.Module
    encoder: BottleneckEncoder
    cloud_tail: CloudTail
    mean: list[float]
    std: list[float]
    cut_shape: tuple[int, ...]
    code_spatial: tuple[int, int]
    rates: RatePoints | None = None


def load_checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a user's state dict from safetensors or a ``torch.save`` file, without pickle."""
    if not path.is_file():
        raise RecipeError(f"teacher checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        # weights_only refuses anything but tensors and plain containers: say so plainly.
        raise RecipeError(f"cannot load teacher checkpoint {path} safely: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise RecipeError(f"{path} does not hold a state dict")
    return state


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of ``model``'s class, state-dict keys, shapes and values: a checkpoint
    made from one network is not resumed on another."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for key, value in model.state_dict().items():
        digest.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _phase_seed(seed: int, phase: str, epoch: int) -> int:
    return zlib.crc32(f"{seed}/{phase}/{epoch}".encode())


def lr_at(cfg: OptimConfig, step: int, total: int) -> float:
    """Learning rate at ``step`` of ``total``: linear warm-up, then cosine decay to zero."""
    warm = max(1, int(cfg.warmup_fraction * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _batches(n: int, size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, size):
        yield order[start : start + size]


def make_optimizer(cfg: OptimConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The phase's optimizer, as its config names it."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class PhaseRunner:
    """Runs the epochs of one phase with its optimizer, a warm-up/cosine schedule and
    checkpoints.

    Each step runs under :func:`tandem.device.autocast` for ``device`` and ``precision``
    (a no-op on the CPU and in fp32), with fp16's loss scaling on CUDA.
    """

    def __init__(
        self,
        ckpt: Checkpointer,
        read: Reader,
        seed: int,
        show_progress: bool,
        device: torch.device = CPU,
        precision: Precision = "fp32",
    ) -> None:
        self.ckpt = ckpt
        self.read = read
        self.seed = seed
        self.show_progress = show_progress
        self.device = device
        self.precision = precision

    def run(
        self,
        phase: str,
        cfg: OptimConfig,
        modules: dict[str, nn.Module],
        n_samples: int,
        batch_loss: BatchLoss,
    ) -> None:
        """Train ``modules`` for ``cfg.epochs`` epochs, resuming from a checkpoint if any."""
        status = self.ckpt.status(phase)
        if status is not None and status.done:
            self.ckpt.restore(phase, modules)
            log.info("%s: already complete, weights restored", phase)
            return
        params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        opt = make_optimizer(cfg, params)
        # One loss scale per phase (fp16 on CUDA only); a resumed phase starts it afresh.
        scaler = grad_scaler(self.device, self.precision)
        start = self.ckpt.restore(phase, modules, opt) if status is not None else 0
        for epoch in range(start, cfg.epochs):
            seed = _phase_seed(self.seed, phase, epoch)
            # The global RNG drives dropout: reseeding it too makes a resumed epoch identical.
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            loss = self._epoch(
                phase, epoch, cfg, modules, (opt, scaler), n_samples, batch_loss, gen
            )
            log.info("%s epoch %d/%d: loss %.4f", phase, epoch + 1, cfg.epochs, loss)
            self.ckpt.save(phase, epoch + 1, modules, opt, done=epoch + 1 == cfg.epochs)
        if cfg.epochs == 0:
            self.ckpt.save(phase, 0, modules, None, done=True)

    def _epoch(
        self,
        phase: str,
        epoch: int,
        cfg: OptimConfig,
        modules: dict[str, nn.Module],
        step: tuple[torch.optim.Optimizer, torch.amp.GradScaler],
        n_samples: int,
        batch_loss: BatchLoss,
        gen: torch.Generator,
    ) -> float:
        """One pass over the data; returns the smoothed loss at its end."""
        steps_per_epoch = math.ceil(n_samples / cfg.batch_size)
        for m in modules.values():
            m.train()
        order = list(_batches(n_samples, cfg.batch_size, gen))
        bar = progress_bar(
            self.read(order),
            total=steps_per_epoch,
            desc=f"{phase} {epoch + 1}/{cfg.epochs}",
            show=self.show_progress,
        )
        running = 0.0
        opt, scaler = step
        for i, batch in enumerate(bar):
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, epoch * steps_per_epoch + i, steps_per_epoch * cfg.epochs)
            with autocast(self.device, self.precision):
                loss = batch_loss(batch, gen)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            value = float(loss.detach())
            running = 0.9 * running + 0.1 * value if i else value
            # No redraw of its own: the next step's update draws it, at the bar's own pace.
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        return running


def random_shift(
    x: torch.Tensor, max_shift: int, gen: torch.Generator, fill: torch.Tensor | None = None
) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels: a random crop of the image padded
    by ``max_shift``. What is uncovered repeats the edge pixels, or takes ``fill`` (one value
    per channel) when given."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    pads = (max_shift,) * 4
    if fill is None:
        padded = F.pad(x, pads, mode="replicate")
    else:
        level = fill.to(x.device, x.dtype).view(1, c, 1, 1)
        padded = F.pad(x - level, pads) + level
    # Drawn on the CPU from the phase's generator whatever the device, so a run retraces the
    # same shifts on a GPU; only the index tensors travel.
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].to(x.device)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].to(x.device)
    every = torch.arange(n, device=x.device)[:, None, None]
    return padded[every, :, rows, cols].permute(0, 3, 1, 2)


def augment(
    x: torch.Tensor, cfg: TeacherConfig, black: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """The teacher's training augmentation of a normalised batch, as its recipe asks: a random
    translation (edge or ``black`` fill), then a left-right flip of a random half."""
    fill = black if cfg.augment_fill == "black" else None
    x = random_shift(x, cfg.augment_shift, gen, fill)
    if cfg.augment_flip:
        flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def _in_layout(model: nn.Module, layout: torch.memory_format) -> nn.Module:
    """``model`` with its 4-d weights in ``layout`` (channels-last or the usual one)."""
    return model.to(memory_format=layout)  # type: ignore[call-overload]  # torch's stubs lack it


def sandwich(widths: list[float], gen: torch.Generator) -> list[float]:
    """The widths trained in one step: largest, smallest and one drawn from between."""
    ordered = sorted(widths)
    if len(ordered) <= 2:
        return ordered[::-1]
    middle = ordered[1:-1]
    pick = middle[int(torch.randint(len(middle), (1,), generator=gen))]
    return [ordered[-1], ordered[0], pick]


@torch.inference_mode()
def batched_outputs(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Run ``model`` in eval mode over ``x`` in batches, each moved to the model's device,
    and concatenate the outputs on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat(
        [model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    )


def accuracy(logits: torch.Tensor | np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy as a fraction in [0, 1] (of logits on any device)."""
    if isinstance(logits, torch.Tensor):
        logits = logits.cpu().numpy()
    return float((np.asarray(logits).argmax(1) == labels).mean())


class Targets:
    """The teacher's outputs (features at the cut, or logits) for a batch of the student's
    inputs: looked up by row in ``cached``, or, without a cache, computed for the batch."""

    def __init__(self, model: nn.Module, cached: torch.Tensor | None) -> None:
        self.model = model
        self.cached = cached

    def __call__(self, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Float targets for the batch of ``rows`` whose (maybe augmented) inputs are ``x``."""
        if self.cached is not None:
            return self.cached[rows.to(self.cached.device)].float()
        with torch.no_grad():
            return self.model(x).float()


class Distiller:
    """Runs a recipe's phases on one data set, checkpointing into ``out_dir``.

    The teacher is the recipe's zoo architecture, or ``model`` when given (a user's own
    network, used as it is unless ``train_teacher``: then the recipe's teacher phase trains
    it first). ``model`` is trained in place, never copied. Models see uint8 images as
    ``(x / 255 - mean) / std`` per channel: ``stats`` gives (mean, std), as a pretrained
    network expects them; by default they are measured over the training split.
    """

    def __init__(
        self,
        recipe: Recipe,
        data: DataSet,
        out_dir: Path,
        *,
        fresh: bool,
        progress: bool,
        workers: int | None = None,
        device: torch.device = CPU,
        model: nn.Module | None = None,
        train_teacher: bool = False,
        stats: tuple[list[float], list[float]] | None = None,
    ) -> None:
        self.recipe = recipe
        self.data = data
        self.workers = workers
        self.device = device
        self.model = model
        self.train_teacher = train_teacher
        fingerprint = f"{recipe.fingerprint()}:{data.spec}"
        if model is not None:  # a resumed run must have started from the same network
            fingerprint += f":{model_fingerprint(model)}:{train_teacher}"
        if stats is not None:
            fingerprint += f":{stats}"
        self.runner = PhaseRunner(
            Checkpointer(out_dir / "checkpoint", fingerprint, fresh=fresh),
            lambda order: self.normalized(data.train.batches(order, workers, self.pin)),
            recipe.seed,
            progress,
            device,
            recipe.precision,
        )
        self.mean, self.std = stats if stats is not None else split_stats(data.train, workers)
        black = np.zeros((1, len(self.mean), 1, 1), np.uint8)
        self.black = normalize(black, self.mean, self.std)[0, :, 0, 0]  # what padding shows

    @property
    def pin(self) -> bool:
        """Whether batches are read into page-locked memory (for a GPU)."""
        return self.device.type == "cuda"

    def normalized(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """The batches on the training device, their images as the models' normalised
        float inputs (normalised there: a GPU receives the uint8 pixels, a quarter of the
        bytes)."""
        for b in batches:
            x = b.x.to(self.device, non_blocking=True)
            y = b.y.to(self.device, non_blocking=True)
            yield Batch(b.idx, normalize_tensor(x, self.mean, self.std), y)

    @torch.inference_mode()
    def outputs(self, model: nn.Module, split: Split, batch_size: int = 512) -> torch.Tensor:
        """``model``'s outputs (eval mode) over every row of ``split``, in order, on the
        training device, read in batches: the split's images are never all in memory."""
        model.eval()
        batches = self.normalized(split.in_order(batch_size, self.workers, self.pin))
        return torch.cat([model(b.x) for b in batches])

    def teacher(self) -> nn.Module:
        """The trained teacher: the user's model as it is, the recipe's checkpoint, or
        trained by the recipe's teacher phase (from scratch, or from the user's model)."""
        cfg = self.recipe.teacher
        torch.manual_seed(self.recipe.seed)
        if self.model is not None:
            if not self.train_teacher:
                return self.model.to(self.device).eval()
            return self._train_teacher(self.model)
        model = build_model(
            cfg.arch.name,
            num_classes=len(self.data.classes),
            in_channels=self.data.input_shape[0],
            **cfg.arch.args,
        )
        if cfg.checkpoint:
            try:
                model.load_state_dict(load_checkpoint_weights(Path(cfg.checkpoint)), strict=True)
            except RuntimeError as exc:
                raise RecipeError(
                    f"teacher checkpoint {cfg.checkpoint} does not fit {cfg.arch.name} with "
                    f"{len(self.data.classes)} classes and args {cfg.arch.args}: {exc}"
                ) from exc
            return model.to(self.device).eval()
        return self._train_teacher(model)

    def _train_teacher(self, model: nn.Module) -> nn.Module:
        """The recipe's teacher phase on ``model``: cross-entropy on augmented batches."""
        cfg = self.recipe.teacher
        # Channels-last only while training: the bundle and the rest of the run see the
        # usual layout (the weights are saved contiguous either way).
        layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = _in_layout(model.to(self.device), layout)

        def loss(batch: Batch, gen: torch.Generator) -> torch.Tensor:
            x = augment(batch.x, cfg, self.black, gen).contiguous(memory_format=layout)
            return F.cross_entropy(model(x), batch.y, label_smoothing=cfg.label_smoothing)

        self.runner.run("teacher", cfg.train, {"teacher": model}, len(self.data.train), loss)
        return _in_layout(model, torch.contiguous_format).eval()

    def student(self, teacher: nn.Module) -> DistilledModels:
        """Distil the bottleneck student from a trained teacher (both stages)."""
        torch.manual_seed(self.recipe.seed + 1)
        parts = split_model(teacher, self.recipe.cut)
        with torch.no_grad():
            cut_shape = tuple(parts.head.eval()(self._probe()).shape[1:])
        if len(cut_shape) != 3:
            raise RecipeError(f"cut {self.recipe.cut!r} carries shape {cut_shape}; need (C, H, W)")
        b = self.recipe.bottleneck
        encoder, decoder = build_bottleneck(
            self.data.input_shape[0], cut_shape[0], b.channels, b.widths, b.encoder, b.decoder
        )
        encoder, decoder = encoder.to(self.device), decoder.to(self.device)
        code_spatial = self._check_shapes(encoder, decoder, cut_shape)
        cloud = CloudTail(decoder, copy.deepcopy(parts.tail))
        betas = self.recipe.rate.betas
        rates = RatePoints(b.channels, len(betas)).to(self.device) if betas else None
        scale = (
            self._feature_variance(parts.head) if self.recipe.rate.distortion == "relative" else 1.0
        )
        self._distil_head(encoder, decoder, self._targets(parts.head), rates, scale)
        self._finetune(encoder, cloud, self._targets(teacher), rates)
        # Everything that is measured and written from here on lives on the CPU.
        for module in (teacher, encoder, cloud, *([rates] if rates is not None else [])):
            module.cpu()
        return DistilledModels(
            teacher,
            encoder.eval(),
            cloud.eval(),
            self.mean,
            self.std,
            cut_shape,
            code_spatial,
            rates.freeze() if rates is not None else None,
        )

    def _probe(self) -> torch.Tensor:
        """The first training image, normalised, on the training device: for shape checks."""
        return normalize(self.data.train.take([0]), self.mean, self.std).to(self.device)

    def _feature_variance(self, head: nn.Module) -> float:
        """The variance of every value of ``head``'s features over the first
        :data:`VARIANCE_SAMPLE` training inputs (as they are, not augmented): the relative
        distortion's unit, so that β does not depend on the overall scale of the teacher's
        features. Read 256 inputs at a time and summed in float64: a large cut's features
        are never all in memory."""
        count, total, squares = 0, 0.0, 0.0
        with torch.no_grad():
            for start in range(0, min(VARIANCE_SAMPLE, len(self.data.train)), 256):
                rows = np.arange(start, min(start + 256, VARIANCE_SAMPLE, len(self.data.train)))
                x = normalize(self.data.train.take(rows), self.mean, self.std)
                f = batched_outputs(head, x).double()
                count += f.numel()
                total += float(f.sum())
                squares += float((f * f).sum())
        if count < 2:
            raise RecipeError("the relative distortion needs training inputs to measure")
        variance = (squares - total * total / count) / (count - 1)
        if not (math.isfinite(variance) and variance > 0):
            raise RecipeError(
                f"the teacher's features at {self.recipe.cut!r} are constant or not finite"
            )
        log.info("teacher features at %s: variance %.4g (the distortion's unit)",
                 self.recipe.cut, variance)  # fmt: skip
        return variance

    def _targets(self, model: nn.Module) -> Targets:
        """``model``'s outputs as the student phases' targets: cached once over the training
        split when those phases see the images as they are (stored in half precision when
        they are features), computed for each batch when they see them augmented."""
        if self.recipe.distill.augment:
            return Targets(model.eval(), None)
        cached = self.outputs(model, self.data.train)
        return Targets(model, cached.half() if cached.dim() > 2 else cached)

    def _student_input(self, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        """A batch as the student phases see it: augmented as the teacher was, or not."""
        if not self.recipe.distill.augment:
            return batch.x
        return augment(batch.x, self.recipe.teacher, self.black, gen)

    def _check_shapes(
        self, encoder: nn.Module, decoder: nn.Module, cut_shape: tuple
    ) -> tuple[int, int]:
        """Check the decoder rebuilds the cut's shape; return the code's spatial size."""
        with torch.no_grad():
            code = encoder.eval()(self._probe())
            probe = decoder.eval()(code)
        if tuple(probe.shape[1:]) != cut_shape:
            raise RecipeError(
                f"the decoder produces {tuple(probe.shape[1:])} but the cut "
                f"{self.recipe.cut!r} carries {cut_shape}: adjust bottleneck.encoder strides "
                "or bottleneck.decoder upsampling"
            )
        return int(code.shape[-2]), int(code.shape[-1])

    def _distil_head(
        self,
        encoder: BottleneckEncoder,
        decoder: nn.Module,
        target: Targets,
        rates: RatePoints | None,
        scale: float = 1.0,
    ) -> None:
        """Stage 2: encoder and decoder imitate the teacher's features at the cut, the
        distortion being their MSE over ``scale`` (1, or the features' variance)."""
        widths = self.recipe.bottleneck.widths
        rate = self.recipe.rate
        pixels = math.prod(self.data.input_shape[1:])

        def one_width(
            x: torch.Tensor, goal: torch.Tensor, w: float, point: int, gen: torch.Generator
        ) -> torch.Tensor:
            z = encoder(x, w)
            if rates is None or point == len(rates):  # the plain features (quantise+zstd)
                return F.mse_loss(decoder(z), goal) / scale
            coded = rates.noisy(z, point, gen)
            bits_per_pixel = coded.bits().mean() / pixels
            distortion = F.mse_loss(decoder(coded.features), goal) / scale
            return distortion + rate.betas[point] * bits_per_pixel

        def loss(batch: Batch, gen: torch.Generator) -> torch.Tensor:
            x = self._student_input(batch, gen)
            goal = target(batch.idx, x)
            chosen = sandwich(widths, gen)
            # Drawn only with rate points, so a recipe without them trains as it always did.
            draws = (
                torch.randint(len(rates) + 1, (len(chosen),), generator=gen).tolist()
                if rates is not None
                else [0] * len(chosen)
            )
            total = sum(
                (one_width(x, goal, w, p, gen) for w, p in zip(chosen, draws, strict=True)),
                torch.zeros(()),
            )
            return total

        modules: dict[str, nn.Module] = {"encoder": encoder, "decoder": decoder}
        if rates is not None:
            modules["rates"] = rates
        self.runner.run("head", self.recipe.distill.head, modules, len(self.data.train), loss)

    def _finetune(
        self,
        encoder: BottleneckEncoder,
        cloud: CloudTail,
        teacher_logits: Targets,
        rates: RatePoints | None,
    ) -> None:
        d, rate = self.recipe.distill, self.recipe.rate
        widths, temp = self.recipe.bottleneck.widths, d.temperature
        pixels = math.prod(self.data.input_shape[1:])
        # Encoder and priors are what the exported tables describe: frozen, unless the recipe
        # trains them end to end (the tables are exported after this stage either way).
        frozen = rates is not None and not rate.end_to_end
        if frozen:
            assert rates is not None
            encoder.eval().requires_grad_(False)
            rates.freeze()
        # A draw picks one of the codec's bit depths, or one rate point after them.
        modes = len(d.quant_bits) + (len(rates) if rates is not None else 0)

        def sent(
            x: torch.Tensor, w: float, mode: int, gen: torch.Generator
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """What the decoder receives at width ``w`` in ``mode``, and the rate term."""
            no_rate = torch.zeros(())
            with torch.no_grad() if frozen else contextlib.nullcontext():
                z = encoder(x, w)
            if mode < len(d.quant_bits):
                return fake_quantize(z, d.quant_bits[mode]), no_rate
            assert rates is not None
            point = mode - len(d.quant_bits)
            if frozen:
                return rates.dequantize(rates.symbols(z, point), point), no_rate
            coded = rates.straight_through(z, point, gen)
            return coded.features, rate.betas[point] * coded.bits().mean() / pixels

        def one_width(
            x: torch.Tensor, batch: Batch, goal: torch.Tensor, w: float, mode: int,
            gen: torch.Generator,
        ) -> torch.Tensor:  # fmt: skip
            features, rate_term = sent(x, w, mode, gen)
            logits = cloud(features)
            ce = F.cross_entropy(logits, batch.y)
            kl = F.kl_div(
                F.log_softmax(logits / temp, 1),
                F.log_softmax(goal / temp, 1),
                log_target=True,
                reduction="batchmean",
            )
            return (1 - d.kd_weight) * ce + d.kd_weight * temp * temp * kl + rate_term

        def loss(batch: Batch, gen: torch.Generator) -> torch.Tensor:
            x = self._student_input(batch, gen)
            goal = teacher_logits(batch.idx, x)
            draws = torch.randint(modes, (len(widths),), generator=gen).tolist()
            return sum(
                (
                    one_width(x, batch, goal, w, draw, gen)
                    for w, draw in zip(sandwich(widths, gen), draws, strict=False)
                ),
                torch.zeros(()),
            )

        modules: dict[str, nn.Module] = {"encoder": encoder, "cloud": cloud}
        if rates is not None and not frozen:
            modules["rates"] = rates
        if frozen:
            del modules["encoder"]
        self.runner.run("finetune", d.finetune, modules, len(self.data.train), loss)
