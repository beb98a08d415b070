"""Adapters into the cloud model repository, as new versions the service hot-loads.

A bundle in the repository keeps its adapters in ``adapters/<name>/<version>/``; versions are
integers counting up and are never overwritten. ``tandem.adapters.save_adapter`` writes each
one atomically, so the service's next scan sees the whole adapter or nothing.

An adapter that also adapts the head is published in two parts under one version: the head
part to ``head-adapters/<name>/<version>/`` (keyed by encoder paths, for the edge daemon's
``--head-adapter``), then the decoder + tail part to ``adapters/<name>/<version>/``. The head
part goes first, so by the time the service can serve a version, its head part exists. The
head part's metadata names the tail part it pairs with (none for a head-only adapter) and the
width and bits both were trained at, so a daemon given the head part asks for the right rest.
"""

from __future__ import annotations

from pathlib import Path

from tandem.adapters import ADAPTERS_DIR, HEAD_ADAPTERS_DIR, adapter_dir
from tandem.federated.lora import Arrays, publish, rank_of, split_head


def next_version(bundle_dir: Path, name: str) -> str:
    """One more than the highest integer version of adapter ``name``, head or tail part
    (``"1"`` for none)."""
    roots = [bundle_dir / ADAPTERS_DIR / name, bundle_dir / HEAD_ADAPTERS_DIR / name]
    taken = [int(p.name) for r in roots if r.is_dir() for p in r.iterdir() if p.name.isdigit()]
    return str(max(taken, default=0) + 1)


def publish_adapter(
    bundle_dir: Path,
    name: str,
    arrays: Arrays,
    scale: float,
    tenant: str = "",
    *,
    width: float,
    bits: int,
) -> list[Path]:
    """Write ``arrays`` (LoRA scale ``scale``, trained at ``width`` and ``bits``) as the next
    version of ``name``: the paths written, the head part's first. ValueError for no arrays."""
    if not (bundle_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{bundle_dir} is not a bundle in a model repository")
    if not arrays:
        raise ValueError(f"adapter {name!r} has no LoRA weights to publish")
    version = next_version(bundle_dir, name)
    head, tail = split_head(arrays)
    written = []
    if head:
        pair = {"name": name, "version": version} if tail else None
        meta = {"tail_adapter": pair, "width": width, "bits": bits}
        written.append(adapter_dir(bundle_dir, name, version, head=True))
        publish(written[-1], head, alpha=scale * rank_of(head), tenant=tenant, metadata=meta)
    if tail:
        written.append(adapter_dir(bundle_dir, name, version))
        publish(written[-1], tail, alpha=scale * rank_of(tail), tenant=tenant)
    return written
