"""The edge daemon's settings, validated before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tandem import codec
from tandem.address import parse_address
from tandem.config import StrictModel
from tandem.edge.sinks import STDOUT_SINKS


class DaemonConfig(StrictModel):
    """Everything ``tandem edge run`` takes."""

    bundle: Path
    cloud: str = Field(description="HOST:PORT of the cloud service")
    source: str = Field(
        description="DIR, digits, npz:PATH, imagefolder:DIR (a test split), jsonl:PATH, or - "
        "for JSON lines on stdin"
    )
    sink: str = Field("-", description="JSON-lines file, or - for stdout")
    spool: Path | None = Field(
        None,
        description="default: SINK.spool; for the stdout sink, a temporary spool that is "
        "removed when the run leaves nothing pending",
    )
    fresh: bool = Field(False, description="discard the spool's pending inputs and cursors first")
    model: str | None = Field(None, description="model name on the server (default: bundle's)")
    adapter: str = ""
    adapter_version: str = Field("", description="the adapter's version (default: the newest)")
    head_adapter: Path | None = Field(
        None, description="LoRA adapter directory to merge into the head (head-adapters/N/V)"
    )
    width: float | None = Field(
        None, description="fix the width instead of letting the policy pick"
    )
    bits: int | None = Field(None, description="fix the bits instead of letting the policy pick")
    point: int | None = Field(
        None, ge=0, description="fix the entropy codec's rate point instead of the policy's pick"
    )
    slo_ms: float = Field(100.0, gt=0)
    concurrency: int = Field(32, ge=1, le=4096, description="requests in flight")
    transport: Literal["stream", "unary"] = Field(
        "stream", description="one InferStream for every request, or a unary call each"
    )
    head_batch: int = Field(32, ge=1, le=4096)
    limit: int | None = Field(None, ge=0, description="only inputs with index below this")
    runtime: Literal["torch", "onnx"] = Field(
        "torch",
        description="what runs the head: PyTorch, or ONNX Runtime on the bundle's exported "
        "head (`tandem export BUNDLE --onnx`; no PyTorch needed, no local fallback)",
    )
    fallback: bool = Field(True, description="serve locally when the cloud is unreachable")
    fallback_after_s: float = Field(3.0, gt=0, description="retrying this long means unreachable")
    probe_s: float = Field(2.0, gt=0, description="while local, try the cloud again this often")
    give_up_after_s: float | None = Field(
        None, gt=0, description="without fallback: stop retrying an unreachable cloud this late"
    )
    attempt_timeout_s: float = Field(10.0, gt=0)
    deadline_ms: int = Field(0, ge=0, description="per-request budget the server enforces")
    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token_file: Path | None = Field(None, description="file holding this device's bearer token")
    max_message_bytes: int = Field(1 << 20, ge=1024)

    def fixed(self) -> bool:
        """Whether the options fix the operating point, leaving the policy nothing to pick."""
        return self.width is not None and (self.bits is not None or self.point is not None)

    @model_validator(mode="after")
    def _consistent(self) -> DaemonConfig:
        """Address, fixed operating point and key pair are checked together."""
        parse_address(self.cloud)
        if self.bits is not None and self.bits not in codec.SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {codec.SUPPORTED_BITS}")
        if self.bits is not None and self.point is not None:
            raise ValueError("bits (quantise+zstd) and point (entropy codec) exclude each other")
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        if self.runtime == "onnx" and self.head_adapter is not None:
            raise ValueError(
                "a head adapter is merged by PyTorch: use --runtime torch, or export a head "
                "with the adapter merged in"
            )
        return self

    def paired(self) -> DaemonConfig:
        """This config completed from its head adapter's metadata, where the options leave it
        open: the tail adapter (name and version) it was trained with, and its width and bits.

        A head adapter without that metadata (not published by a federation) changes nothing.
        ValueError when ``adapter`` or ``adapter_version`` name another tail adapter than the
        one it pairs with: that tail was never trained on what this head sends.
        """
        if self.head_adapter is None:
            return self
        from tandem.adapters import read_metadata  # PyTorch's side: the head adapter needs it

        meta = read_metadata(self.head_adapter)
        if "tail_adapter" not in meta:
            return self
        name, version = _pair(meta["tail_adapter"], self.head_adapter)
        if (self.adapter or name) != name or (self.adapter_version or version) != version:
            pairs = f"tail adapter {name} version {version}" if name else "the bundle's own tail"
            raise ValueError(
                f"head adapter {self.head_adapter} was trained with {pairs}: "
                f"drop --adapter/--adapter-version or give the matching ones"
            )
        update: dict[str, object] = {"adapter": name, "adapter_version": version}
        if self.width is None:
            update["width"] = float(meta["width"])
        if self.bits is None and self.point is None:
            update["bits"] = int(meta["bits"])
        return DaemonConfig.model_validate({**self.model_dump(), **update})

    def spool_path(self) -> Path | None:
        """Where the spool lives: ``spool``, else next to a file sink; None for the stdout
        sink, whose run keeps its spool in a temporary directory (it cannot be resumed from
        the sink anyway: stdout cannot be read back)."""
        if self.spool is not None:
            return self.spool
        return (
            None if self.sink in STDOUT_SINKS else Path(f"{self.sink.removeprefix('jsonl:')}.spool")
        )

    def token(self) -> str | None:
        """The bearer token, read from ``token_file`` (first line, stripped)."""
        if self.token_file is None:
            return None
        lines = self.token_file.read_text().strip().splitlines()
        if not lines or not lines[0].strip():
            raise ValueError(f"{self.token_file} holds no token")
        return lines[0].strip()


def _pair(value: object, where: Path) -> tuple[str, str]:
    """(name, version) of a head adapter's ``tail_adapter`` entry; ("", "") for null."""
    if value is None:
        return "", ""
    if not isinstance(value, dict) or not all(
        isinstance(value.get(k), str) and value[k] for k in ("name", "version")
    ):
        raise ValueError(f"head adapter {where}: tail_adapter must be null or a name and version")
    return value["name"], value["version"]
