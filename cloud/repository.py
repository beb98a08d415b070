"""The model repository: every bundle under one directory, loaded and kept current.

Any directory up to two levels below the root that holds a ``manifest.json`` is a bundle,
as ``tandem train --out`` writes it (``root/digits/`` or ``root/digits/v2/``). A bundle or a
new version of one dropped in later is picked up by the next :meth:`ModelRepository.scan`,
which the server runs on a timer and whenever a request names something it does not know.
``write_bundle`` writes the manifest last, so a bundle still being copied is never half-read.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tandem.adapters import Adapter, list_adapters, load_adapter, merged_state
from tandem.bundle import MANIFEST, Manifest, TailRunner, read_manifest
from tandem.cloud.lora_batch import MixedLoRA

log = logging.getLogger(__name__)

ADAPTED_COPIES = 16
"""Adapted copies of a tail kept in memory per bundle version (least recently used go)."""


class NotFoundError(LookupError):
    """No such model, version, adapter or adapter version."""


@dataclass
class ModelEntry:
    """One loaded bundle version and its adapters."""

    path: Path
    manifest: Manifest
    runner: TailRunner
    mtime: float
    adapters: dict[str, dict[str, Adapter]] = field(default_factory=dict)
    _adapted: OrderedDict[tuple[str, str], nn.Module] = field(default_factory=OrderedDict)
    _mixed: MixedLoRA | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        """The bundle's name."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """The bundle's version (named after its weights' hashes)."""
        return self.manifest.version

    def trained_width(self, width: float) -> float | None:
        """The trained width that ``width`` names, or None.

        Widths travel as float32, so 0.3 arrives as 0.30000001...; match within 1e-6.
        """
        return next((w for w in self.manifest.bottleneck.widths if abs(w - width) < 1e-6), None)

    def shape_for(self, width: float) -> tuple[int, ...]:
        """The (C, H, W) feature shape the decoder takes at a trained ``width``."""
        return tuple(self.manifest.bottleneck.shapes[str(width)])

    def adapter(
        self, name: str, version: str = "", usable: Callable[[Adapter], bool] = lambda a: True
    ) -> Adapter:
        """An adapter by name: the given version, else the newest one that is ``usable``.

        Without a usable version the newest is returned, for the caller to refuse: another
        tenant publishing under the same name must not change which version a tenant gets.
        """
        versions = self.adapters.get(name)
        if not versions:
            raise NotFoundError(f"model {self.name} has no adapter {name!r}")
        if not version:
            candidates = {v: a for v, a in versions.items() if usable(a)} or versions
            return candidates[newest(candidates)]
        if version not in versions:
            raise NotFoundError(f"adapter {name!r} has no version {version!r}")
        return versions[version]

    def model_for(self, adapter: Adapter) -> nn.Module:
        """A copy of decoder + tail with ``adapter`` merged into its weights.

        A copy per adapter, not weights swapped into the shared module: worker threads run
        batches for different adapters at once, and swapping would let one tenant's batch
        run with another's weights. The most recently used copies are kept.
        """
        key = (adapter.name, adapter.version)
        with self._lock:
            model = self._adapted.get(key)
            if model is None:
                model = self._copy()
                with torch.no_grad():
                    for name, weight in merged_state(self.runner.model, adapter).items():
                        model.get_parameter(name).copy_(weight)
                self._adapted[key] = model
            self._adapted.move_to_end(key)
            while len(self._adapted) > ADAPTED_COPIES:
                self._adapted.popitem(last=False)
            return model

    def mixed(self) -> MixedLoRA:
        """The copy of decoder + tail that serves rows with different adapters in one pass.

        Built on first use; every adapter and thread shares it (see ``cloud/lora_batch.py``).
        """
        with self._lock:
            if self._mixed is None:
                shapes = [self.shape_for(w) for w in self.manifest.bottleneck.widths]
                self._mixed = MixedLoRA(self._copy(), shapes)
            return self._mixed

    def _copy(self) -> nn.Module:
        """A private copy of decoder + tail: built from the weights in memory, not from disk,
        which may hold a newer version by now; and not a deepcopy, which would copy hooks."""
        return TailRunner.from_state(self.manifest, self.runner.model.state_dict()).model


def newest(versions: dict[str, Adapter]) -> str:
    """The version published last: the highest number when all are numbers, else by name."""
    keys = list(versions)
    if all(k.isdigit() for k in keys):
        return max(keys, key=int)
    return max(keys)


class ModelRepository:
    """Bundles under ``root``, keyed by (name, version); thread-safe."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"model repository {self.root} is not a directory")
        self._models: dict[tuple[str, str], ModelEntry] = {}
        self._lock = threading.Lock()

    def scan(self) -> int:
        """Load bundles and adapters that appeared, drop those that vanished; return the count.

        A bundle that fails to load is logged and skipped: one bad upload must not take
        the others down.
        """
        found: dict[tuple[str, str], ModelEntry] = {}
        for manifest_path in self._manifests():
            entry = self._entry_for(manifest_path.parent)
            if entry is None:
                continue
            key = (entry.name, entry.version)
            if key in found:
                log.warning("%s duplicates %s %s; ignored", entry.path, *key)
                continue
            self._refresh_adapters(entry)
            found[key] = entry
        with self._lock:
            self._models = found
        return len(found)

    def _manifests(self) -> list[Path]:
        paths = [*self.root.glob(f"*/{MANIFEST}"), *self.root.glob(f"*/*/{MANIFEST}")]
        return sorted(p for p in paths if p.is_file())

    def _entry_for(self, path: Path) -> ModelEntry | None:
        try:
            mtime = (path / MANIFEST).stat().st_mtime
            with self._lock:
                known = [e for e in self._models.values() if e.path == path and e.mtime == mtime]
            if known:
                return known[0]
            manifest = read_manifest(path)
            entry = ModelEntry(path, manifest, TailRunner.from_bundle(path), mtime)
        except Exception as exc:  # an unknown architecture, a bad cut, unreadable files...
            log.error("skipping bundle %s: %s", path, exc)
            return None
        log.info("loaded %s version %s from %s", manifest.name, manifest.version, path)
        return entry

    def _refresh_adapters(self, entry: ModelEntry) -> None:
        adapters: dict[str, dict[str, Adapter]] = {}
        try:
            found = list_adapters(entry.path)
        except OSError as exc:  # e.g. a directory removed while it was listed: keep what we had
            log.error("cannot list adapters of %s: %s", entry.path, exc)
            return
        for name, version, path in found:
            known = entry.adapters.get(name, {}).get(version)
            if known is None:
                try:
                    known = load_adapter(path, name, version)
                    merged_state(entry.runner.model, known)  # refuse one that does not fit
                except Exception as exc:  # one bad adapter must not hide the others
                    log.error("skipping adapter %s: %s", path, exc)
                    continue
                log.info("loaded adapter %s/%s for %s", name, version, entry.name)
            adapters.setdefault(name, {})[version] = known
        entry.adapters = adapters

    def resolve(self, name: str, version: str = "") -> ModelEntry:
        """A model by name: the given version, or the one whose manifest appeared last."""
        with self._lock:
            candidates = [e for (n, _), e in self._models.items() if n == name]
        if not candidates:
            raise NotFoundError(f"unknown model {name!r}")
        if not version:
            return max(candidates, key=lambda e: (e.mtime, e.version))
        for entry in candidates:
            if entry.version == version:
                return entry
        raise NotFoundError(f"model {name!r} has no version {version!r}")

    def models(self) -> list[ModelEntry]:
        """Every loaded bundle version, by name then version."""
        with self._lock:
            return sorted(self._models.values(), key=lambda e: (e.name, e.version))
