"""Declarative training recipes, validated by pydantic.

A recipe is a TOML file: data only, never code. Built-in recipes ship inside the package
(``tandem/recipes/*.toml``) and are named by their stem; any other argument is read as a path.
``--set KEY=VALUE`` overrides a dotted key before validation, the value parsed as a TOML literal
(:func:`parse_assignment`, shared with ``tandem fed simulate --set``).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from tandem.codec import SUPPORTED_BITS
from tandem.entropy_codec import MAX_POINTS
from tandem.widths import width_channels


class RecipeError(ValueError):
    """A recipe could not be found, parsed, overridden or validated."""


class StrictModel(BaseModel):
    """Base of every config and manifest: unknown keys are errors, instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_bits(bits: list[int]) -> list[int]:
    if not bits or len(set(bits)) != len(bits) or any(b not in SUPPORTED_BITS for b in bits):
        raise ValueError(f"need distinct bit depths among {SUPPORTED_BITS}, got {bits}")
    return bits


class ArchConfig(StrictModel):
    """A zoo architecture by registry name, with its constructor arguments."""

    name: str
    args: dict[str, int | float | bool | str] = Field(default_factory=dict)


class OptimConfig(StrictModel):
    """One training phase: AdamW (or SGD with Nesterov momentum) with a linear warm-up and
    cosine decay."""

    epochs: int = Field(ge=0)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    optimizer: Literal["adamw", "sgd"] = Field(
        default="adamw", description="sgd: Nesterov momentum, weight decay as an L2 term (the "
        "usual choice for ResNets on photographs)"
    )  # fmt: skip
    momentum: float = Field(default=0.9, ge=0, lt=1, description="sgd's momentum")


class TeacherConfig(StrictModel):
    """The original model: trained here from scratch, or loaded from a checkpoint."""

    arch: ArchConfig
    checkpoint: str | None = None
    train: OptimConfig
    augment_shift: int = Field(
        default=0, ge=0, description="random translation in pixels (a random crop of the "
        "image padded by this many pixels)"
    )  # fmt: skip
    augment_fill: Literal["edge", "black"] = Field(
        default="edge", description="what the translation uncovers: the edge pixels repeated, "
        "or black (the usual padding for photographs)"
    )  # fmt: skip
    augment_flip: bool = Field(default=False, description="flip half the images left to right")
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=1, description="the teacher's cross-entropy against labels "
        "smoothed by this much"
    )  # fmt: skip
    channels_last: bool = Field(
        default=False, description="train in channels-last memory format (on 2 CPU cores, a "
        "quarter-width ResNet-18 on 32x32 colour images ran 661 instead of 492 images/s)"
    )  # fmt: skip


class BottleneckConfig(StrictModel):
    """The learned encoder (device side) and decoder (cloud side) around the cut."""

    channels: int = Field(ge=1)
    widths: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    encoder: list[tuple[PositiveInt, PositiveInt]] = Field(
        min_length=1, description="(channels, stride) of each 3x3 conv-BN-ReLU stage"
    )
    decoder: list[tuple[PositiveInt, PositiveInt]] = Field(
        default_factory=list, description="(channels, upsampling factor) of each stage"
    )

    @field_validator("widths")
    @classmethod
    def _widths_in_range(cls, widths: list[float]) -> list[float]:
        if not widths or any(not 0 < w <= 1 for w in widths):
            raise ValueError("widths must be fractions in (0, 1]")
        return sorted(set(widths))

    @model_validator(mode="after")
    def _widths_distinct(self) -> BottleneckConfig:
        counts = [width_channels(self.channels, w) for w in self.widths]
        if len(set(counts)) != len(counts):
            raise ValueError(f"widths {self.widths} of {self.channels} channels give {counts}")
        return self


class DistillConfig(StrictModel):
    """Two-stage distillation: head distillation (MSE), then fine-tuning with KD."""

    head: OptimConfig
    finetune: OptimConfig
    temperature: float = Field(default=4.0, gt=0)
    kd_weight: float = Field(default=0.5, ge=0, le=1)
    quant_bits: list[int] = Field(default_factory=lambda: [2, 4, 8])
    augment: bool = Field(
        default=False, description="the student phases see the teacher's augmentation "
        "(teacher.augment_*), the teacher's targets computed for each augmented batch; "
        "otherwise they see the images as they are, the targets computed once and cached"
    )  # fmt: skip

    _quant_bits_valid = field_validator("quant_bits")(_check_bits)


class RateConfig(StrictModel):
    """The learned entropy model: one rate point per β (none: the quantise+zstd codec only).

    Head distillation minimises feature distortion + β · bits per input pixel at each point
    (``distortion``: plain MSE, in the units of the teacher's features, or MSE over their
    variance, which does not change when they are scaled);
    fine-tuning then trains decoder and tail on the rounded, coded features. With
    ``end_to_end``, fine-tuning also trains encoder, gains and priors, on the task loss +
    β · bits per input pixel, so each point keeps the bits the task needs rather than those
    the features need.
    """

    betas: list[float] = Field(
        default_factory=list, max_length=MAX_POINTS, description="rate weights, one point each"
    )
    end_to_end: bool = Field(
        default=False, description="fine-tuning also trains encoder and priors with the rate"
    )
    distortion: Literal["mse", "relative"] = Field(
        default="mse", description="head distillation's distortion: the features' mean squared "
        "error, or that error over the variance of the teacher's features at the cut (so a β "
        "does not depend on the overall scale of the teacher's features)"
    )  # fmt: skip

    @field_validator("betas")
    @classmethod
    def _betas_valid(cls, betas: list[float]) -> list[float]:
        if any(b < 0 for b in betas) or len(set(betas)) != len(betas):
            raise ValueError(f"betas must be distinct and non-negative, got {betas}")
        return betas


class Recipe(StrictModel):
    """Everything ``tandem train`` needs besides the data."""

    name: str
    seed: int = 0
    cut: str
    teacher: TeacherConfig
    bottleneck: BottleneckConfig
    distill: DistillConfig
    rate: RateConfig = Field(default_factory=RateConfig)
    eval_bits: list[int] = Field(default_factory=lambda: [16, 8, 4, 2])
    default_bits: int = 4
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="training steps on CUDA under autocast in this precision "
        "(fp16 with loss scaling); the CPU always trains in fp32"
    )  # fmt: skip

    _eval_bits_valid = field_validator("eval_bits")(_check_bits)

    @model_validator(mode="after")
    def _default_measured(self) -> Recipe:
        if self.default_bits not in self.eval_bits:
            raise ValueError(f"default_bits {self.default_bits} must be among eval_bits")
        return self

    def fingerprint(self) -> str:
        """A short hash of the recipe, used to refuse resuming a different run. Keys left at
        their defaults are not hashed, so a key added in a later version (at a default that
        keeps the old behaviour) leaves the runs of earlier versions resumable."""
        blob = json.dumps(self.model_dump(mode="json", exclude_defaults=True), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped inside the package."""
    folder = resources.files("tandem.recipes")
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def _read_recipe_text(name_or_path: str) -> str:
    if name_or_path in builtin_recipes():
        return (resources.files("tandem.recipes") / f"{name_or_path}.toml").read_text()
    path = Path(name_or_path)
    if path.is_file():
        return path.read_text()
    raise RecipeError(
        f"no recipe {name_or_path!r}: not a built-in ({', '.join(builtin_recipes())}) nor a file"
    )


def parse_value(text: str) -> Any:
    """Parse a TOML literal (number, boolean, 'string', array...), falling back to the plain
    string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignment(text: str, option: str = "--set") -> tuple[str, Any]:
    """``KEY=VALUE`` as ``(KEY, value)``: the one grammar of ``--set`` (``tandem train`` and
    ``tandem fed simulate``) and of ``profile --arg``.

    Both sides are stripped; KEY must not be empty; VALUE is read by :func:`parse_value`. What
    a key may name is the caller's business (a dotted recipe key, a flat run-config key);
    callers accept its words joined by ``-`` or ``_`` alike.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"{option} expects KEY=VALUE, got {text!r}")
    return key.strip(), parse_value(value.strip())


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Set a dotted ``key=value`` (see :func:`parse_assignment`) in a raw recipe dictionary,
    in place; recipe keys are spelt with ``_``, so a ``-`` in a key means ``_``."""
    key, value = parse_assignment(assignment)
    *parents, leaf = key.replace("-", "_").split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {key}: {part!r} is not a table")
        node = child
    node[leaf] = value


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe by built-in name or path."""
    try:
        raw = tomllib.loads(_read_recipe_text(name_or_path))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {name_or_path!r} is not valid TOML: {exc}") from exc
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"recipe {name_or_path!r} is invalid: {problems(exc)}") from None


def problems(exc: ValidationError, dashed: bool = False, shown: int | None = None) -> str:
    """A validation error as one line: ``field.path: problem`` for each problem, joined by
    ``; `` (never pydantic's multi-line dump). ``dashed`` spells field names with ``-``, as
    Flower's run config does; ``shown`` keeps the first problems only, and says how many more
    there were."""
    errors = exc.errors()
    parts = []
    for err in errors[:shown]:
        where = ".".join(str(p) for p in err["loc"])
        if dashed:
            where = where.replace("_", "-")
        message = " ".join(err["msg"].removeprefix("Value error, ").split())
        parts.append(f"{where}: {message}" if where else message)
    more = f" (and {len(errors) - len(parts)} more)" if len(errors) > len(parts) else ""
    return "; ".join(parts) + more


def settings_error(what: str, exc: ValidationError) -> ValueError:
    """A settings model's validation error as one line naming the offending options."""
    return ValueError(f"invalid {what}: {problems(exc)}")
