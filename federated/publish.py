"""Adapters into the cloud model repository, as new versions the service hot-loads.

A bundle in the repository keeps its adapters in ``adapters/<name>/<version>/``; versions are
integers counting up and are never overwritten. ``cloud.adapters.save_adapter`` writes each
one atomically, so the service's next scan sees the whole adapter or nothing.
"""

from __future__ import annotations

from pathlib import Path

from federated.lora import Arrays, publish, rank_of


def next_version(bundle_dir: Path, name: str) -> str:
    """One more than the highest integer version of adapter ``name`` (``"1"`` for none)."""
    root = bundle_dir / "adapters" / name
    taken = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []
    return str(max(taken, default=0) + 1)


def publish_adapter(
    bundle_dir: Path, name: str, arrays: Arrays, scale: float, tenant: str = ""
) -> Path:
    """Write ``arrays`` (LoRA scale ``scale``) as the next version of ``name``; its path."""
    if not (bundle_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{bundle_dir} is not a bundle in a model repository")
    path = bundle_dir / "adapters" / name / next_version(bundle_dir, name)
    publish(path, arrays, alpha=scale * rank_of(arrays), tenant=tenant)
    return path
