"""The model repository against a careless or hostile writer (issue 12).

Each test builds a repository by hand the way a person or an attacker would (FIFOs, files
copied one by one, bad uploads, links out of the tree) and scans it directly.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from serving import make_repo

from tandem.adapters import save_adapter
from tandem.bundle import BundleError, TailRunner
from tandem.cloud.repository import ModelRepository, NotFoundError
from tandem.entropy_points import ENTROPY_FILE

SCAN_WAIT_S = 60.0  # a scan of these few small bundles takes well under a second
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "tandem.json")
LOGGER = "tandem.cloud.repository"


@pytest.fixture
def repo(tmp_path: Path, digits_bundle: Path) -> Path:
    return make_repo(tmp_path, digits_bundle)


def _copy_as(src: Path, dest: Path, **fields: Any) -> None:
    """A copy of a bundle whose manifest says something else for ``fields``."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("checkpoint", "adapters"))
    manifest = json.loads((dest / "manifest.json").read_text())
    (dest / "manifest.json").write_text(json.dumps({**manifest, **fields}))


def _staged_adapter(where: Path, bundle: Path, tenant: str, seed: int = 0) -> Path:
    """A finished adapter for the digits tail, outside the repository, to be copied in."""
    fc = TailRunner.from_bundle(bundle).model.tail.fc
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, fc.in_features, generator=g)
    b = torch.randn(fc.out_features, 2, generator=g)
    path = where / f"staged-{tenant or 'shared'}-{seed}"
    save_adapter(
        path, lora={"tail.fc": (a, b)}, rank=2, alpha=2.0, target_modules=["tail.fc"], tenant=tenant
    )
    return path


def _adapters(repository: ModelRepository) -> dict[tuple[str, str], str]:
    """(adapter, version) -> owning tenant, over every loaded bundle."""
    return {
        (a.name, a.version): a.tenant
        for e in repository.models()
        for versions in e.adapters.values()
        for a in versions.values()
    }


def _finishes(call: Callable[[], Any], timeout_s: float = SCAN_WAIT_S) -> bool:
    """Whether ``call`` returns within ``timeout_s`` (run on a daemon thread)."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()


def _release(fifo: Path) -> None:
    """Unblock a reader stuck opening ``fifo``: open the write end, then close it (EOF)."""
    with contextlib.suppress(OSError):  # ENXIO: no reader waiting, nothing to release
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def _messages(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


# ------------------------------------------------------------------ files whose read blocks


@pytest.mark.parametrize(
    "where",
    [
        "adapters/a/1/tandem.json",
        "adapters/a/1/adapter_config.json",
        "adapters/a/1/adapter_model.safetensors",
        "manifest.json",
        "tail.safetensors",
    ],
)
def test_a_fifo_does_not_block_the_scan(
    repo: Path, digits_bundle: Path, tmp_path: Path, where: str
) -> None:
    bundle = repo / "digits"
    if where.startswith("adapters/"):
        staged = _staged_adapter(tmp_path, digits_bundle, "acme")
        version = bundle / "adapters" / "a" / "1"
        version.mkdir(parents=True)
        for name in ADAPTER_FILES:
            shutil.copy2(staged / name, version / name)
    fifo = bundle / where
    fifo.unlink()
    os.mkfifo(fifo)
    repository = ModelRepository(repo)
    try:
        # Opening a FIFO for reading waits for a writer: forever, in a scan that does so.
        assert _finishes(repository.scan)
    finally:
        _release(fifo)
    if where.startswith("adapters/"):
        assert [e.name for e in repository.models()] == ["digits"]
    else:
        assert repository.models() == []
    assert _adapters(repository) == {}


def test_a_scan_past_its_budget_leaves_further_loads_to_the_next(
    repo: Path, digits_bundle: Path
) -> None:
    for v in ("v2", "v3"):
        _copy_as(digits_bundle, repo / f"digits-{v}", version=v)
    repository = ModelRepository(repo, scan_budget_s=0)  # spent as soon as one load is done
    counts = [repository.scan() for _ in range(4)]
    assert counts == [1, 2, 3, 3]


# ------------------------------------------------------------------ failures remembered


def _spy_opens(monkeypatch: pytest.MonkeyPatch, under: Path) -> list[str]:
    """Every path under ``under`` opened through ``io.open`` or ``os.open`` from now on."""
    opened: list[str] = []
    real_io, real_os = io.open, os.open

    def note(path: Any) -> None:
        if isinstance(path, str | os.PathLike) and str(under) in os.fspath(path):
            opened.append(os.fspath(path))

    def io_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        note(file)
        return real_io(file, *args, **kwargs)

    def os_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        note(path)
        return real_os(path, *args, **kwargs)

    monkeypatch.setattr(io, "open", io_open)
    monkeypatch.setattr(os, "open", os_open)
    return opened


def test_a_failed_bundle_is_not_read_again_until_its_files_change(
    repo: Path,
    digits_bundle: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _copy_as(digits_bundle, repo / "tampered", name="tampered")
    with (repo / "tampered" / "tail.safetensors").open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")  # same size, another hash
    _copy_as(digits_bundle, repo / "invalid", name="invalid", num_classes=0, cut=7)
    repository = ModelRepository(repo)
    caplog.set_level(logging.INFO, LOGGER)
    repository.scan()
    first = _messages(caplog, "tampered") + _messages(caplog, "invalid")
    assert len(first) == 2, first
    assert all("\n" not in m for m in first), first

    opened = _spy_opens(monkeypatch, repo)
    caplog.clear()
    for _ in range(3):
        repository.scan()
    assert [p for p in opened if "tampered" in p or "invalid" in p] == []
    assert caplog.records == []

    manifest = repo / "invalid" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"cut": 7', '"cut": 8'))
    repository.scan()
    assert len(_messages(caplog, "invalid")) == 1  # changed: read again, and said once more
    assert _messages(caplog, "tampered") == []
    assert [e.name for e in repository.models()] == ["digits"]


def test_an_oversized_weight_file_is_refused_without_being_read(
    repo: Path, digits_bundle: Path
) -> None:
    _copy_as(digits_bundle, repo / "big", name="big")
    with (repo / "big" / "tail.safetensors").open("r+b") as f:
        f.truncate(512 << 20)  # sparse: costs no disk
    repository = ModelRepository(repo)
    tracemalloc.start()
    try:
        repository.scan()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [e.name for e in repository.models()] == ["digits"]
    assert peak < 64 << 20, f"the scan held {peak >> 20} MB of Python memory"


@pytest.mark.parametrize("classes", [200_000, 2_000_000])
def test_a_manifest_claiming_many_classes_is_refused_before_a_model_is_built(
    repo: Path, digits_bundle: Path, monkeypatch: pytest.MonkeyPatch, classes: int
) -> None:
    manifest = json.loads((digits_bundle / "manifest.json").read_text())
    labels = [str(i) for i in range(classes)]
    _copy_as(
        digits_bundle, repo / "huge", name="huge", num_classes=classes,
        input={**manifest["input"], "labels": labels},
    )  # fmt: skip
    built: list[str] = []
    original = TailRunner.from_state.__func__  # type: ignore[attr-defined]

    def spy(
        cls: type[TailRunner],
        m: Any,
        state: Any,
        points: Any = (),
        device: Any = None,
        template: Any = None,
    ) -> TailRunner:
        if m.name == "huge":  # record it, and spare the test the allocation
            built.append(m.name)
            raise BundleError("built")
        return original(cls, m, state, points, device, template)  # type: ignore[no-any-return]

    monkeypatch.setattr(TailRunner, "from_state", classmethod(spy))
    repository = ModelRepository(repo)
    repository.scan()
    assert built == []
    assert [e.name for e in repository.models()] == ["digits"]


# ------------------------------------------------------------------ adapters and their owners


def test_an_adapter_copied_file_by_file_is_hidden_until_its_owner_file_lands(
    repo: Path, digits_bundle: Path, tmp_path: Path
) -> None:
    staged = _staged_adapter(tmp_path, digits_bundle, "acme")
    version = repo / "digits" / "adapters" / "a" / "1"
    version.mkdir(parents=True)
    repository = ModelRepository(repo)
    # cp -r: the weights land first, tandem.json (the owner) a moment later.
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(staged / name, version / name)
    repository.scan()
    assert _adapters(repository) == {}  # not served as shared to every tenant meanwhile
    shutil.copy2(staged / "tandem.json", version / "tandem.json")
    repository.scan()
    assert _adapters(repository) == {("a", "1"): "acme"}


def test_a_change_of_owner_is_picked_up_on_rescan(
    repo: Path, digits_bundle: Path, tmp_path: Path
) -> None:
    version = repo / "digits" / "adapters" / "a" / "1"
    shutil.copytree(_staged_adapter(tmp_path, digits_bundle, "acme"), version)
    repository = ModelRepository(repo)
    repository.scan()
    assert _adapters(repository) == {("a", "1"): "acme"}
    meta = version / "tandem.json"
    meta.write_text(json.dumps({"tenant": "globex"}))
    repository.scan()
    assert _adapters(repository) == {("a", "1"): "globex"}
    meta.write_text(json.dumps({"tenant": ""}))
    repository.scan()
    assert _adapters(repository) == {("a", "1"): ""}
    meta.unlink()  # no owner file: not served, rather than served to everyone
    repository.scan()
    assert _adapters(repository) == {}


def test_an_adapter_without_an_owner_file_is_not_served_and_says_so_once(
    repo: Path, digits_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    version = repo / "digits" / "adapters" / "peft" / "1"
    shutil.copytree(_staged_adapter(tmp_path, digits_bundle, ""), version)
    (version / "tandem.json").unlink(missing_ok=True)  # as PEFT's save_pretrained writes it
    repository = ModelRepository(repo)
    caplog.set_level(logging.INFO, LOGGER)
    for _ in range(3):
        repository.scan()
    assert _adapters(repository) == {}
    (line,) = _messages(caplog, str(version))
    assert "tandem.json" in line


def test_a_shared_adapter_is_published_with_an_owner_file(
    repo: Path, digits_bundle: Path, tmp_path: Path
) -> None:
    version = repo / "digits" / "adapters" / "s" / "1"
    shutil.copytree(_staged_adapter(tmp_path, digits_bundle, ""), version)
    repository = ModelRepository(repo)
    repository.scan()
    assert _adapters(repository) == {("s", "1"): ""}


# ------------------------------------------------------------------ names and versions


def test_an_unknown_version_is_refused_with_the_versions_held(
    repo: Path, digits_bundle: Path
) -> None:
    _copy_as(digits_bundle, repo / "digits-v2", version="v2")  # the same model, retrained
    repository = ModelRepository(repo)
    repository.scan()
    held = sorted(e.version for e in repository.models())
    assert len(held) == 2
    with pytest.raises(NotFoundError) as raised:
        repository.resolve("digits", "nope")
    assert all(v in str(raised.value) for v in held), str(raised.value)


def _unrelated(digits_bundle: Path, dest: Path) -> None:
    """A user's own-images bundle trained from the digits recipe: also named digits."""
    manifest = json.loads((digits_bundle / "manifest.json").read_text())
    labels = [f"kind-{i}" for i in range(manifest["num_classes"])]
    _copy_as(digits_bundle, dest, version="own1", input={**manifest["input"], "labels": labels})


def test_an_unrelated_bundle_under_a_held_name_is_refused_in_one_line(
    repo: Path, digits_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = ModelRepository(repo)
    repository.scan()
    _unrelated(digits_bundle, repo / "a-own-images")  # sorts before the held one
    caplog.set_level(logging.INFO, LOGGER)
    for _ in range(3):
        repository.scan()
    assert [(e.name, e.path) for e in repository.models()] == [("digits", repo / "digits")]
    (line,) = _messages(caplog, str(repo / "a-own-images"))
    assert str(repo / "digits") in line and "\n" not in line


def test_two_unrelated_bundles_found_together_keep_the_first_path(
    repo: Path, digits_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _unrelated(digits_bundle, repo / "own-images")
    caplog.set_level(logging.INFO, LOGGER)
    repository = ModelRepository(repo)
    repository.scan()
    assert [e.path for e in repository.models()] == [repo / "digits"]
    assert len(_messages(caplog, str(repo / "own-images"))) == 1


# ------------------------------------------------------------------ layout warnings


def test_an_empty_repository_warns_once_with_the_layout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    repository = ModelRepository(tmp_path)
    for _ in range(3):
        repository.scan()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "<bundle>/manifest.json" in warnings[0]


def test_serving_a_bundle_directory_says_to_serve_its_parent(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    repository = ModelRepository(repo / "digits")
    for _ in range(3):
        repository.scan()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "parent" in warnings[0] and str(repo) in warnings[0]
    assert "<bundle>/manifest.json" in warnings[0]


# ------------------------------------------------------------------ links


def test_a_bundle_linked_from_outside_the_repository_is_refused_once(
    tmp_path: Path, digits_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "linked"
    root.mkdir()
    (root / "digits").symlink_to(digits_bundle.resolve())
    caplog.set_level(logging.INFO, LOGGER)
    repository = ModelRepository(root)
    for _ in range(3):
        repository.scan()
    assert repository.models() == []
    (line,) = _messages(caplog, str(root / "digits"))
    assert "outside" in line


def test_files_and_adapters_linked_from_outside_are_refused(
    repo: Path, digits_bundle: Path, tmp_path: Path
) -> None:
    _copy_as(digits_bundle, repo / "linked-tail", name="linked-tail")
    tail = repo / "linked-tail" / "tail.safetensors"
    tail.unlink()
    tail.symlink_to(digits_bundle.resolve() / "tail.safetensors")
    (repo / "digits" / "adapters" / "out").mkdir(parents=True)
    (repo / "digits" / "adapters" / "out" / "1").symlink_to(
        _staged_adapter(tmp_path, digits_bundle, "")
    )
    repository = ModelRepository(repo)
    repository.scan()
    assert [e.name for e in repository.models()] == ["digits"]
    assert _adapters(repository) == {}


def test_links_inside_the_repository_are_followed(repo: Path, digits_bundle: Path) -> None:
    _copy_as(digits_bundle, repo / "digits-v2", version="v2")
    tail = repo / "digits-v2" / "tail.safetensors"
    tail.unlink()
    tail.symlink_to(repo / "digits" / "tail.safetensors")
    repository = ModelRepository(repo)
    repository.scan()
    assert sorted(e.path.name for e in repository.models()) == ["digits", "digits-v2"]


def test_an_entropy_file_landing_after_a_failed_scan_is_picked_up(
    tmp_path: Path, digits_entropy_bundle: Path
) -> None:
    """Copied file by file, the tables may arrive after a scan saw the bundle without them:
    the next scan must see the new file, not remember the failure."""
    repo = tmp_path / "repo"
    shutil.copytree(digits_entropy_bundle, repo / "digits", ignore=shutil.ignore_patterns(
        "checkpoint", ENTROPY_FILE))  # fmt: skip
    repository = ModelRepository(repo)
    repository.scan()
    assert repository.models() == []
    shutil.copy(digits_entropy_bundle / ENTROPY_FILE, repo / "digits" / ENTROPY_FILE)
    repository.scan()
    assert [e.name for e in repository.models()] == ["digits"]


def test_an_entropy_file_linked_from_outside_is_refused(
    tmp_path: Path, digits_entropy_bundle: Path
) -> None:
    repo = make_repo(tmp_path, digits_entropy_bundle)
    tables = repo / "digits" / ENTROPY_FILE
    tables.unlink()
    tables.symlink_to(digits_entropy_bundle.resolve() / ENTROPY_FILE)
    repository = ModelRepository(repo)
    repository.scan()
    assert repository.models() == []
