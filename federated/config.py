"""The federation's settings: Flower's run config, validated once on the server.

Flower hands a run config over as a flat mapping (``[tool.flwr.app.config]`` in
``pyproject.toml``, overridden by ``flwr run --run-config``) with dashed keys. ``FedConfig``
turns it into one typed, validated object. The server is its only reader: every setting a
client needs travels to it inside each message (see :meth:`FedConfig.client_config`), so a
SuperNode never depends on what a run config on its own machine says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from tandem.config import StrictModel, problems
from tandem.federated.domains import domain_list

StrategyName = Literal["fedit", "ffa", "hetlora", "flora"]
DpMode = Literal["none", "server-fixed", "server-adaptive", "client-fixed"]
UPDATE_BITS = (4, 8, 16)

DEFAULT_DOMAINS = "rotate:35,invert,noise:0.45,rotate:-35,contrast:0.25,shift:0.15,rotate:70,blur:3"


def rank_list(ranks: str) -> list[int]:
    """The per-client ranks of a comma-separated list ("" for none)."""
    return [int(r) for r in ranks.split(",") if r.strip()]


class FedConfigError(ValueError):
    """A run config that cannot drive a federation."""


class FedConfig(StrictModel):
    """Every setting of a federation, with its default (the same as in ``pyproject.toml``); the
    README's "Federated fine-tuning" section says what each one does."""

    bundle: str
    data: str = "digits"
    num_rounds: int = Field(default=5, ge=1)
    strategy: StrategyName = "fedit"
    server_momentum: float = Field(default=0.0, ge=0, lt=1)
    server_lr: float = Field(default=1.0, gt=0)
    proximal_mu: float = Field(default=0.0, ge=0)
    dp: DpMode = "none"
    dp_noise: float = Field(default=0.1, ge=0)
    dp_clip: float = Field(default=1.0, gt=0)
    rank: int = Field(default=4, ge=1, le=256)
    ranks: str = ""
    alpha: float = Field(default=8.0, gt=0)
    targets: str = "auto"
    head_targets: str = ""
    local_epochs: int = Field(default=2, ge=1)
    lr: float = Field(default=1e-2, gt=0)
    batch_size: int = Field(default=32, ge=1)
    max_samples: int = Field(default=1000, ge=1)
    width: float = Field(default=0.0, ge=0, le=1)
    bits: int = Field(default=0, ge=0)
    point: int = Field(default=-1, ge=-1)  # a rate point of the entropy codec; -1: bits
    partitioner: Literal["iid", "dirichlet"] = "dirichlet"
    dirichlet_alpha: float = Field(default=0.5, gt=0)
    domains: str = DEFAULT_DOMAINS
    update_bits: int = 8
    update_zstd: bool = True
    round_timeout: float = Field(default=600.0, gt=0)
    min_replies: int = Field(default=2, ge=1)
    min_nodes: int = Field(default=2, ge=1)
    fraction_train: float = Field(default=1.0, gt=0, le=1)
    personal_epochs: int = Field(default=1, ge=0)
    eval_samples: int = Field(default=300, ge=1)
    publish: str = ""
    adapter_name: str = "federated"
    publish_every: int = Field(default=0, ge=0)
    publish_personal: bool = False
    tenant: str = ""
    out: str = ""
    seed: int = 0

    @field_validator("bundle")
    @classmethod
    def _bundle(cls, v: str) -> str:
        if not v:
            raise ValueError("set it to a bundle directory: --run-config \"bundle='PATH'\"")
        return v

    @field_validator("update_bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in UPDATE_BITS:
            raise ValueError(f"update-bits must be one of {UPDATE_BITS}, got {v}")
        return v

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, v: str) -> str:
        if v and not all(p.strip().isdigit() and int(p) > 0 for p in v.split(",")):
            raise ValueError(f"ranks must be a comma-separated list of positive integers: {v!r}")
        return v

    @field_validator("adapter_name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v) or v.startswith("."):
            raise ValueError(f"adapter-name must be a plain name (letters, digits, -_.): {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FedConfig:
        if self.min_replies > self.min_nodes:
            raise ValueError("min-replies cannot exceed min-nodes")
        if self.dp != "none" and self.strategy != "fedit":
            raise ValueError(
                f"dp={self.dp} clips whole updates of one shape: it needs strategy fedit, "
                f"not {self.strategy}"
            )
        if self.targets.strip() == "none" and not self.head_targets.strip():
            raise ValueError("targets=none adapts nothing unless head-targets names some")
        if self.point >= 0 and self.bits:
            raise ValueError("bits (quantise+zstd) and point (a rate point) exclude each other")
        if self.point >= 0 and self.head_targets.strip():
            raise ValueError(
                "head-targets train the head through the quantise+zstd codec's rounding; with "
                "a rate point (point >= 0) only decoder + tail adapt"
            )
        if self.ranks and self.strategy not in ("hetlora", "flora"):
            raise ValueError("ranks (one per client) needs strategy hetlora or flora")
        return self

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FedConfig:
        """Parse Flower's flat run config (dashed keys); FedConfigError names what is wrong."""
        values = {str(k).replace("-", "_"): v for k, v in run_config.items()}
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise FedConfigError(f"bad run config: {problems(e, dashed=True)}") from None

    @property
    def max_rank(self) -> int:
        """The largest rank any client trains."""
        return max(rank_list(self.ranks), default=self.rank)

    def domain_list(self) -> list[str]:
        """The per-client domain shifts, in client order."""
        return domain_list(self.domains)

    def client_config(self) -> dict[str, Any]:
        """What a client needs to know, as values a Flower ConfigRecord carries."""
        keys = (
            "bundle", "data", "local_epochs", "lr", "batch_size",
            "max_samples", "width", "bits", "point", "partitioner", "dirichlet_alpha", "domains",
            "update_bits", "update_zstd", "proximal_mu", "seed", "eval_samples", "ranks",
        )  # fmt: skip
        return {k.replace("_", "-"): getattr(self, k) for k in keys}
