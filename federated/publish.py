"""Adapters into the cloud model repository, as new versions the service hot-loads.

A bundle in the repository keeps its adapters in ``adapters/<name>/<version>/``; versions are
integers counting up and are never overwritten. ``tandem.adapters.save_adapter`` writes each
one atomically, so the service's next scan sees the whole adapter or nothing.

An adapter that also adapts the head is published in two parts under one version: the head
part to ``head-adapters/<name>/<version>/`` (keyed by encoder paths, for the edge daemon's
``--head-adapter``), then the decoder + tail part to ``adapters/<name>/<version>/``. The head
part goes first, so by the time the service can serve a version, its head part exists.
"""

from __future__ import annotations

from pathlib import Path

from federated.lora import Arrays, publish, rank_of, split_head
from tandem.adapters import ADAPTERS_DIR, HEAD_ADAPTERS_DIR


def next_version(bundle_dir: Path, name: str) -> str:
    """One more than the highest integer version of adapter ``name``, head or tail part
    (``"1"`` for none)."""
    roots = [bundle_dir / ADAPTERS_DIR / name, bundle_dir / HEAD_ADAPTERS_DIR / name]
    taken = [int(p.name) for r in roots if r.is_dir() for p in r.iterdir() if p.name.isdigit()]
    return str(max(taken, default=0) + 1)


def publish_adapter(
    bundle_dir: Path, name: str, arrays: Arrays, scale: float, tenant: str = ""
) -> list[Path]:
    """Write ``arrays`` (LoRA scale ``scale``) as the next version of ``name``: the paths
    written, the head part's first."""
    if not (bundle_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{bundle_dir} is not a bundle in a model repository")
    version = next_version(bundle_dir, name)
    written = []
    for root, part in zip((HEAD_ADAPTERS_DIR, ADAPTERS_DIR), split_head(arrays), strict=True):
        if part:
            path = bundle_dir / root / name / version
            publish(path, part, alpha=scale * rank_of(part), tenant=tenant)
            written.append(path)
    return written
