"""Scenario files: a fleet of devices, their links, the cloud and the strategies to compare.

A scenario is a YAML mapping (read with ``yaml.safe_load``, so a file can never construct
objects or run code) validated by :class:`Scenario`; :func:`build` turns it into what
:func:`sim.des.simulate` takes. Trace files and profile paths are relative to the scenario
file's directory, so a scenario and its traces can move together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tandem.config import settings_error
from tandem.sim.batching import CloudModel
from tandem.sim.des import DOWNLINK, UPLINK, Device, Strategy
from tandem.sim.profiles import DEVICE_CLASSES, BundleProfile, TableRow, device_class
from tandem.sim.stated import STATED_WIDTH, StatedModel, load_arch_profile, stated_profile
from tandem.sim.traces import Seed, Trace, parse_spec, varies_by_seed

PROFILES_DIR = Path(__file__).parent / "profiles_data"
SCENARIOS_DIR = Path(__file__).parent / "scenarios"
StrategyName = Literal[
    "local", "offload-raw", "offload-png", "offload-jpeg", "offload-webp", "split", "adaptive"
]
STRATEGY_NAMES: tuple[StrategyName, ...] = (
    "local",
    "offload-raw",
    "offload-png",
    "offload-jpeg",
    "offload-webp",
    "split",
    "adaptive",
)
DEFAULT_STRATEGIES: tuple[StrategyName, ...] = (
    "local",
    "offload-raw",
    "offload-png",
    "split",
    "adaptive",
)
"""What a scenario compares when it names none: the input codecs a bundle profile measures."""


class _Strict(BaseModel):
    """Unknown keys and non-finite numbers are errors: a typo must not become a default."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DeviceGroup(_Strict):
    """``count`` identical devices: one class, one pair of traces, one arrival process."""

    count: int = Field(ge=1)
    device_class: str = Field(alias="class")
    uplink: str = Field(min_length=1, description="trace spec or file")
    downlink: str = Field(min_length=1, description="trace spec or file")
    delay_ms: float = Field(default=20.0, ge=0, description="one-way propagation delay")
    fps: float = Field(default=10.0, gt=0)
    arrivals: Literal["periodic", "poisson"] = "periodic"

    @field_validator("device_class")
    @classmethod
    def _known_class(cls, name: str) -> str:
        device_class(name)  # raises, naming the choices
        return name


class CloudSettings(_Strict):
    """The service's batching, as ``tandem cloud serve`` would be told."""

    workers: int = Field(default=1, ge=1)
    max_batch: int = Field(default=32, ge=1)
    max_delay_ms: float = Field(default=2.0, ge=0)


class SplitPoint(_Strict):
    """The fixed strategy's operating point: a row of the profile's table, named by its width
    and either its ``bits`` (quantise+zstd) or its rate ``point`` (entropy codec)."""

    width: float = Field(gt=0, le=1)
    bits: int | None = Field(default=None, ge=1)
    point: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_codec(self) -> SplitPoint:
        if (self.bits is None) == (self.point is None):
            raise ValueError("split: give bits or point, exactly one")
        return self

    def matches(self, row: TableRow) -> bool:
        """Whether ``row`` is this point's row."""
        return math.isclose(row.width, self.width) and (row.bits, row.point) == (
            self.bits,
            self.point,
        )

    def daemon_args(self) -> list[str]:
        """The ``tandem edge run`` options that pin this point."""
        codec = (
            ["--bits", str(self.bits)] if self.bits is not None else ["--point", str(self.point)]
        )
        return ["--width", str(self.width), *codec]

    def describe(self) -> str:
        """The point in words."""
        codec = f"bits {self.bits}" if self.bits is not None else f"rate point {self.point}"
        return f"width {self.width:g}, {codec}"


class Scenario(_Strict):
    """One scenario file (see the README's simulator section for an example)."""

    name: str = Field(min_length=1)
    profile: str | None = Field(
        default=None, min_length=1, description="shipped bundle profile name or JSON file"
    )
    model: StatedModel | None = Field(
        default=None, description="instead of a profile: an architecture profile and stated "
        "figures (tandem.sim.stated)"
    )  # fmt: skip
    devices: list[DeviceGroup] = Field(min_length=1)
    cloud: CloudSettings = CloudSettings()
    strategies: list[StrategyName] = Field(default=list(DEFAULT_STRATEGIES), min_length=1)
    split: SplitPoint | None = None
    slo_ms: float = Field(default=100.0, gt=0)
    duration_s: float = Field(default=60.0, gt=0)
    seed: int = Field(default=0, ge=0, description="device i gets seed + i")

    @model_validator(mode="before")
    @classmethod
    def _stated_defaults(cls, data: Any) -> Any:
        """With a ``model`` block, the defaults fit it: local, raw input, each stated input
        codec and the split, at its one point."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            return data
        data = dict(data)
        codecs = data["model"].get("offload") or {}
        data.setdefault(
            "strategies",
            ["local", "offload-raw", *(f"offload-{c}" for c in codecs), "split"],
        )
        data.setdefault("split", {"width": STATED_WIDTH, "point": 0})
        return data

    @field_validator("strategies")
    @classmethod
    def _unique(cls, names: list[StrategyName]) -> list[StrategyName]:
        if len(set(names)) != len(names):
            raise ValueError(f"each strategy at most once, got {names}")
        return names

    @model_validator(mode="after")
    def _inputs_arrive(self) -> Scenario:
        slow = [g for g, group in enumerate(self.devices) if group.fps * self.duration_s < 1]
        if slow:
            raise ValueError(
                f"devices.{slow[0]}: fps x duration_s is below 1, so no input would arrive"
            )
        return self

    @model_validator(mode="after")
    def _one_source(self) -> Scenario:
        if (self.profile is None) == (self.model is None):
            raise ValueError("give a profile or a model block, exactly one")
        return self

    def source(self) -> str:
        """Where the costs come from, in words: the profile's name or the stated model's."""
        if self.model is not None:
            return f"stated figures on the architecture profile `{self.model.arch_profile}`"
        return f"profile `{self.profile}`"

    @model_validator(mode="after")
    def _split_given(self) -> Scenario:
        if "split" in self.strategies and self.split is None:
            listed = "strategies" in self.model_fields_set
            raise ValueError(
                "split: {width, bits or point} is required when strategies include 'split'"
                + ("" if listed else " (the default strategies do)")
            )
        return self


@dataclass(frozen=True)
class Setup:
    """A scenario made runnable: its devices, the cloud and a ``des.Strategy`` per name."""

    scenario: Scenario
    profile: BundleProfile
    devices: list[Device]
    cloud: CloudModel
    strategies: dict[str, Strategy]


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file; ValueError with one line per problem otherwise."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a scenario is a YAML mapping of name, profile, devices, ...")
    return parse_scenario(data, str(path))


def parse_scenario(data: object, what: str = "scenario") -> Scenario:
    """Validate already-parsed scenario data; ``what`` names it in errors."""
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise settings_error(f"scenario {what}", exc) from None


def open_scenario(path: Path) -> Setup:
    """Load a scenario file and build it, relative to the file's directory."""
    path = Path(path)
    return build(load_scenario(path), path.parent)


def build(scenario: Scenario, base: Path) -> Setup:
    """Devices, cloud and strategies for ``scenario``; relative paths are relative to ``base``."""
    if scenario.model is not None:
        arch = load_arch_profile(_profile_path(scenario.model.arch_profile, base))
        profile = stated_profile(scenario.model, arch)
    else:
        assert scenario.profile is not None
        profile = load_profile(scenario.profile, base)
    return Setup(
        scenario=scenario,
        profile=profile,
        devices=build_devices(scenario, profile, base),
        cloud=profile.cloud(
            scenario.cloud.workers, scenario.cloud.max_batch, scenario.cloud.max_delay_ms
        ),
        strategies={
            name: build_strategy(name, profile, scenario.split, scenario.slo_ms)
            for name in scenario.strategies
        },
    )


def _profile_path(name: str, base: Path) -> Path:
    """A shipped profile by name (``sim/profiles_data/NAME.json``) or a JSON file."""
    shipped = PROFILES_DIR / f"{name}.json"
    path = shipped if shipped.is_file() else base / name
    if not path.is_file():
        names = sorted(p.stem for p in PROFILES_DIR.glob("*.json"))
        raise ValueError(
            f"profile: {name!r} is neither a shipped profile {names} nor a file ({path})"
        )
    return path


def load_profile(name: str, base: Path) -> BundleProfile:
    """A shipped profile by name (``sim/profiles_data/NAME.json``) or a profile JSON file."""
    path = _profile_path(name, base)
    try:
        return BundleProfile.load(path)
    except ValidationError as exc:
        raise settings_error(f"profile {path}", exc) from None
    except ValueError as exc:  # JSON syntax
        raise ValueError(f"profile: cannot read {path}: {exc}") from None


def build_devices(scenario: Scenario, profile: BundleProfile, base: Path) -> list[Device]:
    """Every group's devices in order; device ``i`` of the scenario gets seed ``seed + i``."""
    devices: list[Device] = []
    traces = _Traces(base)
    for g, group in enumerate(scenario.devices):
        compute = DEVICE_CLASSES[group.device_class].device(profile)
        for _ in range(group.count):
            seed = scenario.seed + len(devices)
            # A random-walk link fades on its own per device; up and down independently.
            up = traces.get(group.uplink, (seed, UPLINK), f"devices.{g}.uplink")
            down = traces.get(group.downlink, (seed, DOWNLINK), f"devices.{g}.downlink")
            devices.append(
                Device(
                    compute, up, down, group.delay_ms, group.fps,
                    poisson=group.arrivals == "poisson", seed=seed,
                )
            )  # fmt: skip
    return devices


class _Traces:
    """Parsed traces, shared between devices wherever the seed makes no difference."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._parsed: dict[tuple[str, Seed | None], Trace] = {}

    def get(self, spec: str, seed: Seed, where: str) -> Trace:
        """A trace spec, or a file relative to ``base``; errors name the scenario field."""
        key = (spec, seed if varies_by_seed(spec) else None)
        if key not in self._parsed:
            relative = self.base / spec
            try:
                self._parsed[key] = parse_spec(str(relative) if relative.is_file() else spec, seed)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        return self._parsed[key]


def build_strategy(
    name: str, profile: BundleProfile, split: SplitPoint | None, slo_ms: float
) -> Strategy:
    """The simulator's strategy for a scenario's strategy name.

    Request sizes are what crosses the socket: the payload, the protobuf envelope around it
    and (when the profile was calibrated) the HTTP/2 and gRPC framing.
    """
    wire = profile.wire_overhead_bytes()
    if name == "local":
        return Strategy("local", accuracy=profile.full_accuracy)
    if name.startswith("offload-"):
        payload, accuracy = offload_cost(profile, name.removeprefix("offload-"))
        return Strategy("offload", up_bytes=payload + wire, accuracy=accuracy)
    if name == "split":
        if split is None:
            raise ValueError("split: {width, bits or point} is required for 'split'")
        row = split_row(profile, split)
        up = row.bytes_per_sample + wire
        return Strategy("split", up_bytes=up, width=row.width, accuracy=row.accuracy)
    if name == "adaptive":
        table = tuple(row.policy_row(wire) for row in profile.table)
        return Strategy("adaptive", table=table, slo_ms=slo_ms, accuracy=profile.full_accuracy)
    raise ValueError(f"strategies: unknown strategy {name!r}; choose from {list(STRATEGY_NAMES)}")


def offload_cost(profile: BundleProfile, codec: str) -> tuple[float, float]:
    """(bytes per input, accuracy) of offloading the input coded as ``codec``: raw and PNG
    keep the full model's accuracy, a lossy codec has its own."""
    if codec == "raw":
        return profile.input_bytes, profile.full_accuracy
    if codec == "png":
        if profile.png_bytes is None:
            raise ValueError(f"strategies: profile {profile.bundle} has no PNG size")
        return profile.png_bytes, profile.full_accuracy
    lossy = profile.input_codecs.get(codec)
    if lossy is None:
        known = ", ".join(profile.input_codecs) or "none"
        raise ValueError(f"strategies: profile {profile.bundle} has no {codec} size ({known})")
    return lossy.bytes_per_sample, lossy.accuracy


def split_row(profile: BundleProfile, split: SplitPoint) -> TableRow:
    """The profile's table row for the split point, with a width the profile has times for."""
    for row in profile.table:
        if split.matches(row):
            if row.width not in profile.head_ms or row.width not in profile.tail:
                raise ValueError(f"split: profile {profile.bundle} has no times at {row.width}")
            return row
    points = ", ".join(r.label() for r in profile.table)
    raise ValueError(
        f"split: {split.describe()} is not a row of profile {profile.bundle}'s table "
        f"(width/bits, or width/p<point>: {points})"
    )


def shipped_scenarios() -> list[Path]:
    """The example scenarios in ``sim/scenarios``."""
    return sorted(SCENARIOS_DIR.glob("*.yaml"))
