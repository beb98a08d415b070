"""The model repository: every bundle under one directory, loaded and kept current.

A repository looks like ``REPO/<bundle>/manifest.json`` (or ``REPO/<bundle>/<version>/
manifest.json``), as ``tandem train --out`` writes a bundle. A bundle or a new version of one
dropped in later is picked up by the next :meth:`ModelRepository.scan`, which the server runs
on a timer and whenever a request names something it does not know. ``write_bundle`` writes
the manifest last, so a bundle still being copied is never half-read.

People, scripts and federations write the repository, carelessly or with hostile intent, so
a scan trusts little of it:

- It reads regular files only, opened without blocking (``tandem.files``): a FIFO under a
  file's name never stalls it. It holds no lock that requests take while it reads, and it
  starts loading nothing new once ``scan_budget_s`` has passed (the rest waits for the next).
- A bundle, file or adapter that resolves outside the repository (a link) is refused.
- What failed is remembered with its files' stamps (size, mtime_ns, inode) and not read
  again until one changes; each failure is logged once, in one line.
- Sizes come before reading: a manifest is capped, and ``tail.safetensors`` must have the
  size the manifest's architecture needs (computed on the meta device), so neither a huge
  file nor a manifest claiming a huge model allocates anything.
- An adapter version is served only once complete: config, weights and ``tandem.json``, the
  owner file ``save_adapter`` writes last. A changed ``tandem.json`` is re-read: re-owning
  takes effect on the next scan.
- One name, one model: bundles under one name must agree on what :func:`lineage` covers
  (architecture, classes and labels, input shape, cut); retrained versions of a model do. A
  bundle that disagrees with one already served under its name is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tandem.adapters import (
    META_FILE,
    PUBLISHED_FILES,
    Adapter,
    AdapterError,
    list_adapters,
    load_adapter,
    merged_state,
    read_tenant,
)
from tandem.bundle import (
    MANIFEST,
    TAIL_FILE,
    Manifest,
    TailRunner,
    read_manifest,
    tail_bytes,
    tail_template,
    tensor_bytes,
)
from tandem.cloud.config import ServeConfig
from tandem.cloud.lora_batch import MixedLoRA
from tandem.device import CPU
from tandem.entropy_points import ENTROPY_FILE
from tandem.files import Stamp, resolves_inside, stamp
from tandem.manifest import PROGRAM_FILE

log = logging.getLogger(__name__)

SCAN_BUDGET_S: float = ServeConfig.model_fields["scan_budget_s"].default
"""After this long, a scan starts loading nothing new; the rest waits for the next scan."""
LAYOUT = "REPO/<bundle>/manifest.json (or REPO/<bundle>/<version>/manifest.json)"
_VERSIONS_LISTED = 8  # versions a NOT_FOUND names (status details are short)
# What the service reads of a bundle: a change to any of them is a new state to load, and
# none may be a link out of the repository (a format-1 bundle has no entropy file).
_SERVED_FILES = (MANIFEST, TAIL_FILE, ENTROPY_FILE, PROGRAM_FILE)
_LOG_CHARS = 400  # a logged reason is one line of at most this many characters

ADAPTED_COPIES = 16
"""Adapted copies of a tail kept in memory per bundle version (least recently used go)."""


class NotFoundError(LookupError):
    """No such model, version, adapter or adapter version."""


class RefusedError(ValueError):
    """A bundle or adapter the repository will not load (a link out of it, a bad file)."""


Stamps = tuple[Stamp | None, ...]
"""The stamps of the files one bundle or adapter version is read from, in a fixed order."""


@dataclass
class ModelEntry:
    """One loaded bundle version and its adapters."""

    path: Path
    manifest: Manifest
    runner: TailRunner
    mtime: float
    stamps: Stamps = ()  # of manifest.json and tail.safetensors when loaded
    adapters: dict[str, dict[str, Adapter]] = field(default_factory=dict)
    adapter_stamps: dict[Path, Stamps] = field(default_factory=dict)
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

    def forget(self, adapter: Adapter) -> None:
        """Drop what was built from ``adapter``'s weights: they changed on disk."""
        with self._lock:
            self._adapted.pop((adapter.name, adapter.version), None)
            self._mixed = None

    def _copy(self) -> nn.Module:
        """A private copy of decoder + tail: built from the weights in memory, not from disk,
        which may hold a newer version by now; and not a deepcopy, which would copy hooks."""
        return self.runner.fresh_model()


def newest(versions: dict[str, Adapter]) -> str:
    """The version published last: the highest number when all are numbers, else by name."""
    keys = list(versions)
    if all(k.isdigit() for k in keys):
        return max(keys, key=int)
    return max(keys)


def lineage(manifest: Manifest) -> dict[str, Any]:
    """What every version of one model name must share: the architecture and its arguments,
    the classes and their labels, the input shape and the cut.

    Retraining (new weights, widths, normalisation or codec) keeps it; a bundle trained on
    other classes, or another architecture, under the same name does not.
    """
    return {
        "arch": manifest.arch.model_dump(),
        "classes": manifest.input.labels,
        "input shape": list(manifest.input.shape),
        "cut": manifest.cut,
    }


def _adapter_cap(entry: ModelEntry) -> int:
    """The largest adapter weight file worth reading for ``entry``: LoRA factors of rank up
    to min(in, out) hold at most twice the weights they adapt; twice again for float64."""
    return 4 * tensor_bytes(entry.runner.model)[0] + (1 << 16)


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line, clipped: logs stay one line per event."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _LOG_CHARS else text[: _LOG_CHARS - 3] + "..."


@dataclass
class _Budget:
    """One scan's time. Once past ``deadline`` nothing new is loaded, except that the first
    load of a scan always runs: every scan makes progress, however slow the loads."""

    deadline: float
    loads: int = 0

    def spent(self) -> bool:
        """Whether the scan must leave further loads to the next one."""
        return self.loads > 0 and time.monotonic() > self.deadline


class ModelRepository:
    """Bundles under ``root``, keyed by (name, version); thread-safe.

    :meth:`resolve` and :meth:`models` never wait on a scan's file reads.
    """

    def __init__(
        self,
        root: Path,
        scan_budget_s: float = SCAN_BUDGET_S,
        device: torch.device = CPU,
    ) -> None:
        """Serve the bundles under ``root``, each decoder + tail loaded onto ``device``."""
        self.root = Path(root)
        self.device = device
        if not self.root.is_dir():
            raise NotADirectoryError(f"model repository {self.root} is not a directory")
        self.scan_budget_s = scan_budget_s
        self._models: dict[tuple[str, str], ModelEntry] = {}
        self._lock = threading.Lock()  # guards _models only, and never over I/O
        self._scanning = threading.Lock()  # one scan at a time
        self._failed: dict[Path, Stamps] = {}  # what failed, with the stamps it failed at
        self._manifests: dict[Path, tuple[Stamps, Manifest]] = {}
        self._said: set[tuple[Hashable, ...]] = set()  # log lines already written
        self._empty_warned = False

    def scan(self) -> int:
        """Load bundles and adapters that appeared or changed, drop those that vanished;
        return the count of bundle versions served.

        A bundle that fails to load is logged once and skipped until its files change: one
        bad upload must not take the others down, nor the log. Bundles already served are
        visited first, so a newcomer never displaces one of them.
        """
        with self._scanning:
            budget = _Budget(time.monotonic() + self.scan_budget_s)
            with self._lock:
                held = {e.path: e for e in self._models.values()}
            paths = self._bundle_dirs()
            found: dict[tuple[str, str], ModelEntry] = {}
            for path in sorted(paths, key=lambda p: (p not in held, p)):
                entry = self._entry_for(path, held.get(path), found, budget)
                if entry is not None:
                    self._refresh_adapters(entry, budget)
                    found[(entry.name, entry.version)] = entry
            self._forget_all_but(set(paths))
            with self._lock:
                self._models = found
            self._check_layout(bool(paths))
            return len(found)

    def _bundle_dirs(self) -> list[Path]:
        """Every directory one or two levels down with a manifest (only stat, no reads)."""
        manifests = [*self.root.glob(f"*/{MANIFEST}"), *self.root.glob(f"*/*/{MANIFEST}")]
        return sorted({m.parent for m in manifests})

    def _entry_for(
        self,
        path: Path,
        held: ModelEntry | None,
        found: dict[tuple[str, str], ModelEntry],
        budget: _Budget,
    ) -> ModelEntry | None:
        """The entry to serve from ``path``: the held one while its files are unchanged,
        else a fresh load, or None (failed, refused, or left for the next scan)."""
        stamps = tuple(stamp(path / name) for name in _SERVED_FILES)
        if held is not None and held.stamps == stamps:
            return held if self._admits(path, held.manifest, found) else None
        if self._failed.get(path) == stamps:
            return None
        manifest = self._manifest(path, stamps)
        if manifest is None or not self._admits(path, manifest, found):
            return None
        if budget.spent():
            self._say(("deferred", path, stamps), log.info, "loading %s waits for the next "
                      "scan: this one ran past %.0f s", path, self.scan_budget_s)  # fmt: skip
            return held
        budget.loads += 1
        try:
            runner = TailRunner.from_bundle(path, manifest, self.device)
        except Exception as exc:  # a bad cut, wrong sizes or hashes, unreadable weights...
            self._fail(path, stamps, "skipping bundle %s: %s", exc)
            return None
        assert stamps[0] is not None  # the manifest was read
        log.info("loaded %s version %s from %s", manifest.name, manifest.version, path)
        return ModelEntry(path, manifest, runner, stamps[0].mtime_ns / 1e9, stamps)

    def _manifest(self, path: Path, stamps: Stamps) -> Manifest | None:
        """``path``'s manifest, read once per state of its files; None when it fails."""
        known = self._manifests.get(path)
        if known is not None and known[0] == stamps:
            return known[1]
        try:
            for name in _SERVED_FILES:
                self._inside(path / name)
            manifest = read_manifest(path)
            # The architecture must build, or the exported program load (on the meta device).
            tail_bytes(manifest, tail_template(path, manifest))
        except Exception as exc:  # a link out, an invalid manifest, an unknown architecture
            self._fail(path, stamps, "skipping bundle %s: %s", exc)
            return None
        self._manifests[path] = (stamps, manifest)
        return manifest

    def _admits(
        self, path: Path, manifest: Manifest, found: dict[tuple[str, str], ModelEntry]
    ) -> bool:
        """Whether ``manifest`` may join ``found``: no second copy of a version, and no
        bundle whose :func:`lineage` differs from the one served under its name."""
        same = found.get((manifest.name, manifest.version))
        if same is not None:
            self._say(("duplicate", path, same.path), log.warning,
                      "%s duplicates %s (%s version %s); ignored", path, same.path,
                      manifest.name, manifest.version)  # fmt: skip
            return False
        mine = lineage(manifest)
        for other in found.values():
            theirs = lineage(other.manifest)
            if other.name == manifest.name and theirs != mine:
                differ = ", ".join(k for k in mine if mine[k] != theirs[k])
                self._say(("unrelated", path, other.path, differ), log.error,
                          "refusing %s: model %r is served from %s, and this is another model "
                          "under the same name (%s differ); rename one (tandem train --set "
                          "name=...)", path, manifest.name, other.path, differ)  # fmt: skip
                return False
        return True

    def _refresh_adapters(self, entry: ModelEntry, budget: _Budget) -> None:
        """Serve the entry's complete adapter versions, re-reading owners that changed."""
        try:
            listed = list_adapters(entry.path)
        except OSError as exc:  # e.g. a directory removed while it was listed: keep what we had
            self._say(("list", entry.path), log.error, "cannot list adapters of %s: %s",
                      entry.path, _one_line(exc))  # fmt: skip
            return
        adapters: dict[str, dict[str, Adapter]] = {}
        stamps: dict[Path, Stamps] = {}
        for name, version, path in listed:
            served = self._adapter(entry, name, version, path, budget)
            if served is not None:
                adapters.setdefault(name, {})[version], stamps[path] = served
        entry.adapters, entry.adapter_stamps = adapters, stamps

    def _adapter(
        self, entry: ModelEntry, name: str, version: str, path: Path, budget: _Budget
    ) -> tuple[Adapter, Stamps] | None:
        """The adapter to serve from ``path`` and the stamps of the files it was read from
        (older than the files' when it waits for the next scan), or None."""
        now = tuple(stamp(path / f) for f in PUBLISHED_FILES)
        held = entry.adapters.get(name, {}).get(version)
        before = entry.adapter_stamps.get(path, ())
        if held is not None and before == now:
            return held, now
        if self._failed.get(path) == now:
            return None
        if now[-1] is None:  # the owner file is written last: without it, not complete
            self._say(("unowned", path), log.warning, "adapter %s is not served until it has "
                      "%s, written last (its owner; {\"tenant\": \"\"} shares it)", path,
                      META_FILE)  # fmt: skip
            return None
        try:
            for f in (path, *(path / f for f in PUBLISHED_FILES)):
                self._inside(f)
            if held is not None and before[:-1] == now[:-1]:
                # Only the owner file changed: re-own, keep the weights and what they built.
                return dataclasses.replace(held, tenant=read_tenant(path)), now
            if budget.spent():  # the old files' adapter, if any; loaded next scan
                return None if held is None else (held, before)
            budget.loads += 1
            adapter = load_adapter(path, name, version, max_bytes=_adapter_cap(entry))
            merged_state(entry.runner.model, adapter)  # refuse one that does not fit
        except (AdapterError, RefusedError, OSError) as exc:
            self._fail(path, now, "skipping adapter %s: %s", exc)
            return None
        if held is not None:
            entry.forget(held)
        log.info("loaded adapter %s/%s for %s", name, version, entry.name)
        return adapter, now

    def _inside(self, path: Path) -> None:
        """Raise :class:`RefusedError` when ``path`` resolves outside the repository."""
        if not resolves_inside(path, self.root):
            raise RefusedError(f"{path} resolves outside the model repository {self.root}")

    def _fail(self, path: Path, stamps: Stamps, message: str, exc: BaseException) -> None:
        """Remember that ``path`` failed at ``stamps``, and say so once, in one line."""
        self._failed[path] = stamps
        log.error(message, path, _one_line(exc))

    def _say(self, key: tuple[Hashable, ...], emit: Callable[..., None], *args: Any) -> None:
        """Log ``args`` with ``emit`` the first time ``key`` comes up (keys name paths, and are
        forgotten with them)."""
        if key not in self._said:
            self._said.add(key)
            emit(*args)

    def _forget_all_but(self, bundles: set[Path]) -> None:
        """Drop what is remembered about paths no longer in the repository: a bundle put
        back later is read, and said, afresh; the memory stays as small as the repository."""

        def live(path: Path) -> bool:
            return any(path == b or path.is_relative_to(b) for b in bundles)

        self._failed = {p: s for p, s in self._failed.items() if live(p)}
        self._manifests = {p: m for p, m in self._manifests.items() if p in bundles}
        self._said = {k for k in self._said if isinstance(k[1], Path) and live(k[1])}

    def _check_layout(self, any_bundle: bool) -> None:
        """Warn, once until bundles appear, when the root holds none, saying what a
        repository looks like (and when the root is itself a bundle, to serve its parent)."""
        if any_bundle:
            self._empty_warned = False
            return
        if self._empty_warned:
            return
        self._empty_warned = True
        if (self.root / MANIFEST).exists():
            log.warning("%s is a bundle, not a model repository: serve its parent %s (a "
                        "repository looks like %s)", self.root, self.root.resolve().parent,
                        LAYOUT)  # fmt: skip
        else:
            log.warning("no bundle in model repository %s: a repository looks like %s",
                        self.root, LAYOUT)  # fmt: skip

    def resolve(self, name: str, version: str = "") -> ModelEntry:
        """A model by name: the given version, or the one whose manifest appeared last.

        A version not held is a :class:`NotFoundError` that names the versions held, newest
        first.
        """
        with self._lock:
            candidates = [e for (n, _), e in self._models.items() if n == name]
        if not candidates:
            raise NotFoundError(f"unknown model {name!r}")
        candidates.sort(key=lambda e: (e.mtime, e.version), reverse=True)
        if not version:
            return candidates[0]
        for entry in candidates:
            if entry.version == version:
                return entry
        held = ", ".join(e.version for e in candidates[:_VERSIONS_LISTED])
        more = len(candidates) - _VERSIONS_LISTED
        held += f" and {more} more" if more > 0 else ""
        raise NotFoundError(f"model {name!r} has no version {version!r}; it has {held}")

    def models(self) -> list[ModelEntry]:
        """Every loaded bundle version, by name then version."""
        with self._lock:
            return sorted(self._models.values(), key=lambda e: (e.name, e.version))
