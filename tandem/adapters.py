"""LoRA adapters in PEFT's on-disk format: read, checked, merged and written.

Layout inside a bundle::

    adapters/<name>/<version>/adapter_config.json       PEFT's LoraConfig, as JSON
    adapters/<name>/<version>/adapter_model.safetensors lora_A / lora_B weights
    adapters/<name>/<version>/tandem.json               {"tenant": "acme", ...}, written last
    head-adapters/<name>/<version>/...                  the same, for the head (encoder)

``tandem.json`` names the owning tenant; tenant "" shares the adapter with every tenant. The
cloud serves a version only once it has all three files: ``tandem.json`` is written last
and marks it complete, so a version copied in file by file (``cp -r``) is never served
before its owner is known. (:func:`load_adapter` itself, as a device uses it, reads a
missing ``tandem.json`` as shared.) Adapters
under ``adapters/`` target the decoder + tail and the cloud service serves them; those under
``head-adapters/`` target the encoder and an edge device merges one into its head
(``HeadRunner.from_bundle(bundle, adapter=...)``); the cloud never reads them. A head part's
``tandem.json`` says what it was trained with: ``tail_adapter``, the ``{"name", "version"}`` of
the tail part it pairs with (null: the bundle's own tail), and the ``width`` and ``bits``.

Weights are keyed as PEFT saves them, ``base_model.model.<module>.lora_A.weight`` and
``.lora_B.weight``. Only what plain LoRA needs is supported: ``fan_in_fan_out`` false,
``bias`` "none", no DoRA, no per-module rank or alpha patterns, no extra saved modules;
anything else is refused rather than served wrong. Only safetensors are read, never pickle.

For ``nn.Linear(in, out)``, A is (r, in) and B is (out, r): delta = B @ A * scale.
For ``nn.Conv2d(in, out, k)``, A is a conv (r, in, kh, kw) and B a 1x1 conv (out, r, 1, 1):
delta = (B.flatten(1) @ A.flatten(1)).reshape(out, in, kh, kw) * scale, which is what
PEFT merges, since B(A(x)) is a conv whose kernel is that product. scale is alpha / r, or
alpha / sqrt(r) with ``use_rslora``.

Besides the merged deltas, a loaded adapter keeps each pair's factors (:class:`LoraFactors`)
for serving it unmerged, beside other adapters in one batch (``cloud/lora_batch.py``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from tandem.files import read_regular

ADAPTERS_DIR = "adapters"
MAX_ADAPTER_BYTES = 1 << 30
"""The largest adapter weight file read unless the caller bounds it more tightly."""
HEAD_ADAPTERS_DIR = "head-adapters"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "tandem.json"
PUBLISHED_FILES = (CONFIG_FILE, WEIGHTS_FILE, META_FILE)
"""The files of a complete adapter version; :func:`save_adapter` writes META_FILE last."""
MAX_JSON_BYTES = 1 << 20  # an adapter's config or metadata is a few hundred bytes
KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")

# PEFT options that change what the weights mean; each must be absent or hold this value.
_NEUTRAL_OPTIONS: dict[str, Any] = {
    "fan_in_fan_out": False,
    "bias": "none",
    "use_dora": False,
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
}


class AdapterError(ValueError):
    """An adapter is missing, malformed, unsupported, or does not fit the model."""


EXPORTED_HINT = (
    " (an exported tail, cut from a model outside the zoo, keeps its weights but not its "
    "layers: LoRA there can adapt the decoder's, e.g. decoder.out)"
)
"""Why a module path of an exported tail holds no Linear or Conv2d: its layers are graph
operators, and only bare containers of their weights remain."""


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA pair, float32, shaped for the unmerged forward.

    ``a`` is lora_A as saved: (r, in) for a Linear, (r, in, kh, kw) for a Conv2d. ``b`` is
    lora_B times the adapter's scale, as (r, out): the module adds ``A(x) @ b``.
    """

    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        """The pair's rank r."""
        return int(self.a.shape[0])


@dataclass
class Adapter:
    """A loaded LoRA adapter: its identity, hyper-parameters, per-weight deltas and factors.

    ``deltas`` maps a parameter name (``<module>.weight``) to the float32 tensor to add to
    it; ``targets`` lists the adapted module paths, sorted; ``factors`` maps each of those
    paths to its :class:`LoraFactors`.
    """

    name: str
    version: str
    tenant: str
    rank: int
    alpha: float
    scale: float
    targets: list[str] = field(default_factory=list)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None  # the directory it was loaded from
    factors: dict[str, LoraFactors] = field(default_factory=dict)


def _read_json(path: Path, what: str) -> Any:
    """Parsed JSON of the regular file ``path``, or an AdapterError naming ``what``."""
    try:
        return json.loads(read_regular(path, MAX_JSON_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterError(f"{what} {path} is unreadable: {e}") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{what} {path} is not valid JSON: {e}") from None


def _matches_target(module: str, targets: str | list[str]) -> bool:
    """PEFT's rule: a regex must match the whole path; a name must equal it or end it."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _parse_config(path: Path) -> tuple[int, float, float, str | list[str]]:
    """(rank, alpha, scale, target_modules) from ``adapter_config.json``, validated."""
    cfg = _read_json(path, "adapter config")
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter config {path} must be a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(
            f"adapter config {path}: peft_type is {cfg.get('peft_type')!r}, only 'LORA' is "
            "supported"
        )
    for key, neutral in _NEUTRAL_OPTIONS.items():
        value = cfg.get(key, neutral)
        # JSON null and an empty collection both mean "not used" for the collection options.
        if value != neutral and not (value in (None, {}, []) and neutral in (None, {})):
            raise AdapterError(
                f"adapter config {path}: {key}={value!r} is not supported (need {neutral!r})"
            )
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise AdapterError(f"adapter config {path}: r must be a positive integer, got {rank!r}")
    alpha = cfg.get("lora_alpha")
    if (
        not isinstance(alpha, int | float)
        or isinstance(alpha, bool)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise AdapterError(
            f"adapter config {path}: lora_alpha must be a positive number, got {alpha!r}"
        )
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterError(f"adapter config {path}: use_rslora must be true or false")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) and targets:
        # A regex, matched against whole module paths: a broken one fails here, not later.
        try:
            re.compile(targets)
        except re.error as e:
            raise AdapterError(
                f"adapter config {path}: target_modules is not a valid regex: {e}"
            ) from None
    elif not (
        isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    ):
        raise AdapterError(
            f"adapter config {path}: target_modules must be a non-empty list of module names "
            "or a regex"
        )
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    return rank, float(alpha), scale, targets


def read_metadata(directory: Path) -> dict[str, Any]:
    """``tandem.json`` of the adapter in ``directory``: {} when it has none."""
    path = Path(directory) / META_FILE
    if not os.path.lexists(path):
        return {}
    meta = _read_json(path, "adapter metadata")
    if not isinstance(meta, dict):
        raise AdapterError(f"adapter metadata {path} must be a JSON object")
    return meta


def read_tenant(directory: Path) -> str:
    """The owning tenant from ``tandem.json``: "" (shared) when it names none."""
    tenant = read_metadata(directory).get("tenant", "")
    if not isinstance(tenant, str):
        raise AdapterError(f"adapter metadata {directory / META_FILE}: 'tenant' must be a string")
    return tenant


def adapter_dir(bundle_dir: Path, name: str, version: str, head: bool = False) -> Path:
    """Where version ``version`` of adapter ``name`` lives in a bundle (its head part with
    ``head``)."""
    return Path(bundle_dir) / (HEAD_ADAPTERS_DIR if head else ADAPTERS_DIR) / name / version


def lora_delta(
    module: str, a: torch.Tensor, b: torch.Tensor, rank: int, scale: float
) -> torch.Tensor:
    """The weight delta of one LoRA pair, float32; AdapterError when the shapes are wrong."""
    where = f"module {module!r}"
    shapes = f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}"
    if (a.ndim, b.ndim) not in ((2, 2), (4, 4)):
        raise AdapterError(f"{where}: {shapes} are neither a Linear (2-D) nor a Conv2d (4-D) pair")
    if a.shape[0] != rank or b.shape[1] != rank:
        raise AdapterError(f"{where}: {shapes} do not have rank r={rank}")
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    if a.ndim == 2:
        return (b32 @ a32) * scale
    if tuple(b.shape[2:]) != (1, 1):
        raise AdapterError(f"{where}: conv lora_B must be 1x1, got {tuple(b.shape)}")
    out, (_, cin, kh, kw) = b.shape[0], a.shape
    return (b32.flatten(1) @ a32.flatten(1)).reshape(out, cin, kh, kw) * scale


def _factors(a: torch.Tensor, b: torch.Tensor, scale: float) -> LoraFactors:
    """The unmerged form of a pair that :func:`lora_delta` has already checked."""
    up = (b.to(torch.float32).flatten(1) * scale).T.contiguous()
    return LoraFactors(a.to(torch.float32).contiguous(), up)


def load_adapter(
    path: Path, name: str, version: str, max_bytes: int = MAX_ADAPTER_BYTES
) -> Adapter:
    """Load and validate the adapter in directory ``path``; raises :class:`AdapterError`.

    Only regular files are read (a FIFO never blocks it); a weight file over ``max_bytes``
    is refused unread.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist")
    rank, alpha, scale, target_modules = _parse_config(path / CONFIG_FILE)
    tenant = read_tenant(path)
    weights_path = path / WEIGHTS_FILE
    try:
        tensors = load_safetensors(read_regular(weights_path, max_bytes))
    except FileNotFoundError:
        raise AdapterError(f"adapter weights {weights_path} do not exist") from None
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"adapter weights {weights_path} are unreadable: {e}") from None

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(
                f"adapter weights {weights_path}: unsupported tensor {key!r} (expected "
                f"'{KEY_PREFIX}<module>.lora_A.weight' or '.lora_B.weight')"
            )
        if not tensor.is_floating_point():
            raise AdapterError(f"adapter weights {weights_path}: {key} is {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"adapter weights {weights_path}: {key} has non-finite values")
        pairs.setdefault(m["module"], {})[m["part"]] = tensor
    if not pairs:
        raise AdapterError(f"adapter weights {weights_path} hold no LoRA tensors")

    deltas: dict[str, torch.Tensor] = {}
    factors: dict[str, LoraFactors] = {}
    for module in sorted(pairs):
        pair = pairs[module]
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterError(f"adapter weights {weights_path}: {module!r} has no {missing}")
        if not _matches_target(module, target_modules):
            raise AdapterError(
                f"adapter weights {weights_path}: module {module!r} is not among "
                f"target_modules {target_modules!r}"
            )
        delta = lora_delta(module, pair["A"], pair["B"], rank, scale)
        if not bool(torch.isfinite(delta).all()):
            raise AdapterError(f"adapter weights {weights_path}: {module!r} delta overflows")
        deltas[f"{module}.weight"] = delta
        factors[module] = _factors(pair["A"], pair["B"], scale)
    return Adapter(
        name=name,
        version=version,
        tenant=tenant,
        rank=rank,
        alpha=alpha,
        scale=scale,
        targets=sorted(pairs),
        deltas=deltas,
        path=Path(path),
        factors=factors,
    )


def merged_state(model: nn.Module, adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapted weights of ``model``: each targeted weight plus its delta, nothing else.

    The result holds only the changed parameters, in each weight's dtype and device, and
    is meant for::

        merged = merged_state(model, adapter)  # once per (model, adapter): cache it
        y = torch.func.functional_call(model, merged, (x,), strict=False)

    so one shared base model serves every adapter without being modified. Computing the
    merge costs a matmul per target; the caller computes it once and caches it.
    Raises :class:`AdapterError` when a target is missing, is not an ``nn.Linear`` or
    ``nn.Conv2d``, or its weight's shape differs from the delta's.
    """
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for param, delta in adapter.deltas.items():
            module_path = param.removesuffix(".weight")
            try:
                module = model.get_submodule(module_path)
            except AttributeError:
                raise AdapterError(
                    f"adapter {adapter.name}/{adapter.version}: the model has no module "
                    f"{module_path!r}"
                ) from None
            if not isinstance(module, nn.Linear | nn.Conv2d):
                raise AdapterError(
                    f"adapter {adapter.name}/{adapter.version}: module {module_path!r} is "
                    f"{type(module).__name__}, only Linear and Conv2d can be adapted"
                    + (EXPORTED_HINT if type(module) is nn.Module else "")
                )
            weight = module.weight
            if weight.shape != delta.shape:
                raise AdapterError(
                    f"adapter {adapter.name}/{adapter.version}: delta {tuple(delta.shape)} "
                    f"does not fit {module_path}.weight {tuple(weight.shape)}"
                )
            # Add in float32, then return to the weight's dtype: a bf16 add would lose the
            # small delta against the large weight more than the final rounding does.
            total = weight.detach().to(torch.float32) + delta.to(weight.device)
            merged[param] = total.to(weight.dtype)
    return merged


def save_adapter(
    path: Path,
    *,
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    alpha: float,
    target_modules: list[str],
    tenant: str = "",
    use_rslora: bool = False,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Publish an adapter as directory ``path``, in PEFT's format, all at once.

    ``lora`` maps a module path to its (lora_A, lora_B) weights, shaped as described in the
    module docstring. ``tandem.json`` holds ``tenant`` ("" for shared) and ``metadata`` (JSON
    values), and is written last. The files are
    written to a hidden sibling directory that is then renamed to ``path``: a server scanning
    meanwhile sees the whole adapter or nothing, never weights without their owner (which it
    would take for a shared adapter). ``path`` must not exist yet: versions are immutable.
    """
    if not lora:
        raise AdapterError("an adapter needs at least one LoRA pair")
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b) in lora.items():
        lora_delta(module, a, b, rank, 1.0)  # the same shape checks as loading does
        if not _matches_target(module, target_modules):
            raise AdapterError(f"module {module!r} is not among target_modules {target_modules}")
        # safetensors stores only dense, CPU, contiguous tensors.
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = b.detach().cpu().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(target_modules),
        "use_rslora": use_rslora,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "inference_mode": True,
    }
    path = Path(path)
    if path.exists():
        raise AdapterError(f"{path} exists: publish a new version instead of overwriting one")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        meta = {**(metadata or {}), "tenant": tenant}
        (staging / META_FILE).write_text(json.dumps(meta) + "\n")
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def list_adapters(bundle_dir: Path) -> list[tuple[str, str, Path]]:
    """(name, version, path) of every ``adapters/<name>/<version>/`` with a config, sorted.

    Hidden directories are skipped: :func:`save_adapter` stages new versions in them.
    """
    root = Path(bundle_dir) / ADAPTERS_DIR
    if not root.is_dir():
        return []
    found = [
        (name_dir.name, version_dir.name, version_dir)
        for name_dir in root.iterdir()
        if name_dir.is_dir()
        for version_dir in name_dir.iterdir()
        if not version_dir.name.startswith(".")
        and version_dir.is_dir()
        and (version_dir / CONFIG_FILE).is_file()
    ]
    return sorted(found, key=lambda item: (item[0], item[1]))
