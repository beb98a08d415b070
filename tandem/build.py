"""From a recipe and a data set to a measured bundle: train, measure, write."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tandem import __version__
from tandem.bundle import HeadRunner, Manifest, TailRunner, bottleneck_shapes, write_bundle
from tandem.config import Recipe
from tandem.data import DataSet
from tandem.evaluate import measure_points
from tandem.exported import export_program
from tandem.manifest import PROGRAM_FILE
from tandem.profile import model_flops, profile_cuts
from tandem.progress import bar as progress_bar
from tandem.train import CPU, DistilledModels, Distiller, accuracy

log = logging.getLogger(__name__)


def _manifest_fields(
    recipe: Recipe, data: DataSet, trained: DistilledModels, user_model: bool
) -> dict[str, Any]:
    b = recipe.bottleneck
    # A user's network is named by its class, for people: the cloud reads its program.
    arch = {"name": type(trained.teacher).__name__} if user_model else recipe.teacher.arch
    return {
        "name": recipe.name,
        "arch": arch,
        **({"tail_format": "exported"} if user_model else {}),
        "num_classes": len(data.classes),
        "cut": recipe.cut,
        "input": {
            "shape": data.input_shape,
            "mean": trained.mean,
            "std": trained.std,
            "labels": data.classes,
        },
        "bottleneck": {
            **b.model_dump(),
            "cut_shape": trained.cut_shape,
            "shapes": bottleneck_shapes(b.channels, b.widths, trained.code_spatial),
        },
        "codec": {"bits": recipe.default_bits, "compress": True},
        "teacher_flops": model_flops(trained.teacher, data.input_shape),
        "head_flops": model_flops(trained.encoder, data.input_shape),
        "recipe": {**recipe.model_dump(mode="json"), "tandem_version": __version__},
        **({"format_version": 2, "entropy": {"betas": recipe.rate.betas}} if trained.rates else {}),
    }


def build_bundle(
    recipe: Recipe,
    data: DataSet,
    out: Path,
    *,
    fresh: bool = False,
    progress: bool = False,
    workers: int | None = None,
    device: torch.device = CPU,
    model: nn.Module | None = None,
    train_teacher: bool = False,
    stats: tuple[list[float], list[float]] | None = None,
) -> Manifest:
    """Run ``recipe`` on ``data`` and write a measured bundle to ``out``.

    ``progress`` shows a bar per training epoch and one for the final measurements;
    ``workers`` reader processes stream the data (None: :func:`tandem.data.default_workers`);
    training runs on ``device``, the bundle's weights are written from the CPU either way.

    ``model`` replaces the recipe's zoo teacher with a user's network (trained first by the
    recipe's teacher phase when ``train_teacher``). Its tail then travels as an exported
    program (:mod:`tandem.exported`), and the bundle has no ``full.safetensors``: the cloud
    and the device never need the code that defined it. ``stats`` is the (mean, std) per
    channel that inputs are normalised with (default: the training split's).
    """
    distiller = Distiller(
        recipe, data, out, fresh=fresh, progress=progress, workers=workers, device=device,
        model=model, train_teacher=train_teacher, stats=stats,
    )  # fmt: skip
    teacher = distiller.teacher()
    teacher_acc = accuracy(distiller.outputs(teacher, data.test), data.test.y)
    log.info("teacher test accuracy %.4f", teacher_acc)
    trained = distiller.student(teacher)
    fields = _manifest_fields(recipe, data, trained, model is not None)
    program = (
        export_program(trained.cloud_tail.tail, trained.cut_shape) if model is not None else None
    )
    fields["teacher_accuracy"] = teacher_acc
    fields["profile"] = [p.to_dict() for p in profile_cuts(teacher, data.input_shape, repeats=3)]
    unsaved = {PROGRAM_FILE: "unsaved"} if model is not None else {}
    provisional = Manifest.model_validate({**fields, "version": "unsaved", "files": unsaved})
    rate_points = trained.rates.export() if trained.rates is not None else []
    total = len(recipe.bottleneck.widths) * (len(recipe.eval_bits) + len(rate_points))
    test = data.test.in_memory(workers)  # every point is measured over all of it
    with progress_bar(total=total, desc="measuring", show=progress) as bar:
        points = measure_points(
            HeadRunner(trained.encoder, provisional, rate_points),
            TailRunner(trained.cloud_tail, provisional, rate_points),
            test,
            recipe.eval_bits,
            progress=bar.update,
        )
    fields["table"] = [asdict(p) for p in points]
    full = trained.teacher if model is None else None
    return write_bundle(
        out, fields, trained.encoder, trained.cloud_tail, full, rate_points, program
    )
