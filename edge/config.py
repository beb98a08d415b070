"""The edge daemon's settings, validated before anything starts."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from tandem import codec
from tandem.address import parse_address
from tandem.config import StrictModel


class DaemonConfig(StrictModel):
    """Everything ``tandem edge run`` takes."""

    bundle: Path
    cloud: str = Field(description="HOST:PORT of the cloud service")
    source: str = Field(description="DIR, npz:PATH, jsonl:PATH, or - for JSON lines on stdin")
    sink: str = Field("-", description="JSON-lines file, or - for stdout")
    spool: Path | None = Field(None, description="default: SINK.spool, or ./tandem-edge.spool")
    model: str | None = Field(None, description="model name on the server (default: bundle's)")
    adapter: str = ""
    head_adapter: Path | None = Field(
        None, description="LoRA adapter directory to merge into the head (head-adapters/N/V)"
    )
    width: float | None = Field(
        None, description="fix the width instead of letting the policy pick"
    )
    bits: int | None = Field(None, description="fix the bits instead of letting the policy pick")
    slo_ms: float = Field(100.0, gt=0)
    concurrency: int = Field(32, ge=1, le=4096, description="requests in flight")
    head_batch: int = Field(32, ge=1, le=4096)
    limit: int | None = Field(None, ge=0, description="only inputs with index below this")
    fallback: bool = Field(True, description="serve locally when the cloud is unreachable")
    fallback_after_s: float = Field(3.0, gt=0, description="retrying this long means unreachable")
    probe_s: float = Field(2.0, gt=0, description="while local, try the cloud again this often")
    attempt_timeout_s: float = Field(10.0, gt=0)
    deadline_ms: int = Field(0, ge=0, description="per-request budget the server enforces")
    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token_file: Path | None = Field(None, description="file holding this device's bearer token")
    max_message_bytes: int = Field(1 << 20, ge=1024)

    @model_validator(mode="after")
    def _consistent(self) -> DaemonConfig:
        """Address, fixed operating point and key pair are checked together."""
        parse_address(self.cloud)
        if self.bits is not None and self.bits not in codec.SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {codec.SUPPORTED_BITS}")
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        return self

    def spool_path(self) -> Path:
        """Where the spool lives: next to a file sink, else in the working directory."""
        if self.spool is not None:
            return self.spool
        return Path(f"{self.sink}.spool") if self.sink != "-" else Path("tandem-edge.spool")

    def token(self) -> str | None:
        """The bearer token, read from ``token_file`` (first line, stripped)."""
        if self.token_file is None:
            return None
        lines = self.token_file.read_text().strip().splitlines()
        if not lines or not lines[0].strip():
            raise ValueError(f"{self.token_file} holds no token")
        return lines[0].strip()
