"""Tandem's Python API: split and distil any fx-traceable network, not only the zoo's.

Three calls take a user's own ``nn.Module`` from cut points to a bundle that the cloud
service and the edge daemon serve like any other (and :func:`train_recipe` runs a built-in
recipe on the zoo's models, as ``tandem train`` does through it)::

    import tandem

    for cut in tandem.cut_points(model, example):   # where it can be cut, and at what cost
        print(cut.name, cut.shape, cut.head_flops)
    head, tail = tandem.split_at(model, "layer2", example)   # tail(head(x)) == model(x)
    manifest = tandem.build_bundle(model, "layer2", train, test, out="runs/mine")

``example`` is one input batch (float, as the model takes it); ``train`` and ``test`` are
map-style ``torch.utils.data.Dataset``s of ``(uint8 image tensor (C, H, W), label)`` items.
The bundle's tail travels as a ``torch.export`` program (:mod:`tandem.exported`): the
cloud loads it without the code that defined ``model``, and without pickle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tandem.bundle import Manifest
from tandem.config import Recipe, load_recipe
from tandem.data import from_datasets
from tandem.device import resolve_device
from tandem.exported import export_program
from tandem.profile import CutProfile, ProgressCallback, evaluating, profile_cuts
from tandem.split import SplitError, split_model

__all__ = ["build_bundle", "cut_points", "split_at", "train_recipe"]

# float32 regrouping only: a wrong split is off by O(1), not by these.
_RTOL, _ATOL = 1e-5, 1e-6


def cut_points(
    model: nn.Module,
    example: torch.Tensor,
    *,
    repeats: int = 0,
    cuts: list[str] | None = None,
    progress: ProgressCallback | None = None,
) -> list[CutProfile]:
    """Every place ``model`` can be cut (or the named ``cuts``), in execution order, with
    what each costs for one sample shaped like ``example``'s rows: the tensor crossing
    (shape, bytes) and the head's and tail's FLOPs and parameters. With ``repeats`` above 0
    the head is also timed, the median of that many runs after a warm-up (what
    ``tandem profile`` shows); ``progress`` is called once per cut.

    Raises ``torch.fx``'s errors for a model it cannot trace symbolically, and ValueError
    for a name in ``cuts`` that is not a cut point, a negative ``repeats``, or ``repeats``
    above 0 for a model on the meta device (it has no weights to time).
    """
    return profile_cuts(
        model, tuple(example.shape[1:]), repeats=repeats, cuts=cuts, progress=progress
    )


def split_at(
    model: nn.Module, cut: str, example: torch.Tensor
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """``(head, tail)`` of ``model`` cut at ``cut`` (a module path such as ``"layer2"``, or
    any name :func:`cut_points` lists), checked on ``example``: ``tail(head(example))``
    must equal ``model(example)`` up to float32 rounding, or :class:`SplitError` says so.

    Both halves share ``model``'s submodules (no weights are copied).
    """
    parts = split_model(model, cut)
    with evaluating(model), torch.no_grad():
        whole, halves = model(example), parts.tail(parts.head(example))
    if not (isinstance(whole, torch.Tensor) and isinstance(halves, torch.Tensor)):
        raise SplitError("the model must return one tensor to be split")
    if whole.shape != halves.shape or not torch.allclose(whole, halves, rtol=_RTOL, atol=_ATOL):
        raise SplitError(
            f"tail(head(x)) differs from model(x) at {cut!r}: the model's forward does "
            "something the trace did not capture (data-dependent control flow?)"
        )
    return parts.head, parts.tail


def build_bundle(
    model: nn.Module,
    cut: str,
    train: torch.utils.data.Dataset[Any],
    test: torch.utils.data.Dataset[Any],
    *,
    out: str | Path,
    recipe: str = "digits",
    overrides: Sequence[str] = (),
    name: str | None = None,
    classes: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    train_teacher: bool = False,
    fresh: bool = False,
    progress: bool = False,
    workers: int = 0,
    device: str = "cpu",
) -> Manifest:
    """Distil a bottleneck for ``model`` cut at ``cut`` and write a measured bundle to
    ``out``; return its manifest. The same two stages as ``tandem train``: the encoder and
    decoder learn the teacher's features at the cut, then fine-tune with the tail.

    - ``model`` is the teacher, used as trained, or trained first by the recipe's teacher
      phase when ``train_teacher`` (in place). It must be fx-traceable and cuttable at
      ``cut`` into one crossing tensor of shape (C, H, W).
    - ``recipe`` (a built-in name or a TOML path) gives the bottleneck and the training
      phases, as ``--set`` would with ``overrides`` (``"distill.head.epochs=5"``). Its
      ``teacher.arch`` is ignored; its ``cut`` is replaced by ``cut``.
    - ``name`` is the model name the service serves the bundle under (default: the
      recipe's); ``classes`` names the labels (see :func:`tandem.data.from_datasets`).
    - The teacher and the encoder see uint8 images as ``(x / 255 - mean) / std`` per
      channel: give the ``mean`` and ``std`` ``model`` was trained with (ImageNet's, for a
      torchvision checkpoint); by default they are measured over ``train``.
    - A run interrupted is resumed from ``out/checkpoint`` unless ``fresh``.
    """
    from tandem.build import build_bundle as build

    data = from_datasets(train, test, classes)
    chosen = _recipe(recipe, overrides, cut, name)
    stats = _stats(mean, std, data.input_shape[0])
    _check_exportable(model, cut, data.train.take([0]))  # before any training, not after
    return build(
        chosen,
        data,
        Path(out),
        fresh=fresh,
        progress=progress,
        workers=workers,
        device=resolve_device(device),
        model=model,
        train_teacher=train_teacher,
        stats=stats,
    )


def _check_exportable(model: nn.Module, cut: str, image: np.ndarray) -> None:
    """Fail now, not after training, when ``model`` cannot be cut at ``cut`` or its tail
    cannot travel as an exported program (:class:`tandem.exported.ProgramError` says why)."""
    parts = split_model(model, cut)
    with evaluating(model), torch.no_grad():
        features = parts.head(torch.from_numpy(image).float() / 255.0)
    if features.dim() != 4:
        raise SplitError(f"cut {cut!r} carries shape {tuple(features.shape[1:])}; need (C, H, W)")
    export_program(parts.tail, tuple(features.shape[1:]))


def _stats(
    mean: Sequence[float] | None, std: Sequence[float] | None, channels: int
) -> tuple[list[float], list[float]] | None:
    """(mean, std) as given, one value per input channel each and std positive; or None."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ValueError("give both mean and std, or neither")
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ValueError(
            f"mean and std need {channels} values each (the images' channels), std positive"
        )
    return [float(m) for m in mean], [float(s) for s in std]


def train_recipe(
    recipe: str,
    data: str,
    *,
    out: str | Path,
    overrides: Sequence[str] = (),
    fresh: bool = False,
    progress: bool = False,
    workers: int | None = None,
    device: str = "auto",
    skip_unreadable: bool = False,
) -> Manifest:
    """Run a recipe (a built-in name or a TOML path, with ``--set``-style ``overrides``) on
    a data spec (``digits``, ``npz:PATH``, ``imagefolder:DIR``) and write a measured bundle
    to ``out``: what ``tandem train`` does, which calls this. The teacher is the recipe's zoo
    architecture, trained or loaded from ``teacher.checkpoint``; ``workers`` reader
    processes stream the data (None: the data's default); a wrong ``device`` fails before
    any data is read; ``skip_unreadable`` leaves undecodable images out, counted.
    """
    from tandem.build import build_bundle as build
    from tandem.data import load_data

    chosen_device = resolve_device(device)
    chosen = load_recipe(recipe, list(overrides))
    return build(
        chosen,
        load_data(data, skip_unreadable=skip_unreadable),
        Path(out),
        fresh=fresh,
        progress=progress,
        workers=workers,
        device=chosen_device,
    )


def _recipe(recipe: str, overrides: Sequence[str], cut: str, name: str | None) -> Recipe:
    """The recipe with ``overrides``, the cut and the name applied, validated again."""
    base = load_recipe(recipe, list(overrides)).model_dump(mode="json")
    base["cut"] = cut
    if name is not None:
        base["name"] = name
    return Recipe.model_validate(base)
