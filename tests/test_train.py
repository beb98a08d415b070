"""Distillation: the phases learn, resume exactly, and accept a user's teacher checkpoint."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from phases import assert_resumes_exactly, crash_after, run_phase
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from tandem import train as train_module
from tandem.build import build_bundle
from tandem.bundle import read_manifest
from tandem.config import OptimConfig, RecipeError, TeacherConfig, load_recipe
from tandem.data import load_data
from tandem.train import (
    PhaseRunner,
    Targets,
    augment,
    lr_at,
    make_optimizer,
    random_shift,
    sandwich,
)

SHORT = ["teacher.train.epochs=2", "distill.head.epochs=1", "distill.finetune.epochs=2"]


def test_sandwich_takes_extremes_and_one_middle() -> None:
    gen = torch.Generator().manual_seed(0)
    picks = [sandwich([0.25, 0.5, 0.75, 1.0], gen) for _ in range(50)]
    assert all(p[:2] == [1.0, 0.25] and p[2] in (0.5, 0.75) for p in picks)
    assert {p[2] for p in picks} == {0.5, 0.75}
    assert sandwich([0.5, 1.0], gen) == [1.0, 0.5]


def test_random_shift_moves_content_within_bounds() -> None:
    x = torch.zeros(64, 1, 9, 9)
    x[:, :, 4, 4] = 1.0
    y = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    rows, cols = torch.nonzero(y[:, 0], as_tuple=True)[1:]
    assert rows.min() >= 2 and rows.max() <= 6 and cols.min() >= 2 and cols.max() <= 6
    assert len({(int(r), int(c)) for r, c in zip(rows, cols, strict=True)}) > 10
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)


def test_lr_warms_up_then_decays() -> None:
    cfg = OptimConfig(epochs=1, lr=1.0, warmup_fraction=0.1)
    lrs = [lr_at(cfg, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1)
    assert max(lrs) == pytest.approx(1.0)
    assert lrs[-1] < 0.01
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_bundle_table_covers_every_point_and_learns(digits_bundle: Path) -> None:
    manifest = read_manifest(digits_bundle)
    assert manifest.teacher_accuracy is not None and manifest.teacher_accuracy > 0.7
    points = {(p.width, p.bits): p for p in manifest.table}
    assert set(points) == {(w, b) for w in manifest.bottleneck.widths for b in (16, 8, 4, 2)}
    assert points[(1.0, 8)].accuracy > 0.5
    # Fewer bits and fewer channels must mean fewer bytes.
    assert points[(1.0, 2)].bytes_per_sample < points[(1.0, 8)].bytes_per_sample
    assert points[(0.25, 8)].bytes_per_sample < points[(1.0, 8)].bytes_per_sample
    assert manifest.head_flops < manifest.teacher_flops
    assert manifest.profile and manifest.profile[0]["head_flops"] >= 0


def _weights(bundle: Path) -> dict[str, torch.Tensor]:
    return {
        **load_file(str(bundle / "head.safetensors")),
        **load_file(str(bundle / "tail.safetensors")),
    }


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "b"
    build_bundle(load_recipe("digits", SHORT), load_data("digits"), out)
    return out


# With SHORT, save 1 ends teacher epoch 1 of 2 and save 4 ends fine-tuning epoch 1 of 2: both
# resume inside a phase, with the optimizer's state restored from the checkpoint.
@pytest.mark.parametrize("crash_at", [1, 4])
def test_interrupted_run_resumes_to_identical_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, straight_run: Path, crash_at: int
) -> None:
    recipe, data = load_recipe("digits", SHORT), load_data("digits")
    with monkeypatch.context() as patch:
        crash_after(patch, crash_at)
        with pytest.raises(KeyboardInterrupt):
            build_bundle(recipe, data, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    build_bundle(recipe, data, tmp_path / "resumed")

    straight, resumed = _weights(straight_run), _weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(straight[key], resumed[key], rtol=0, atol=0)


def test_resume_reproduces_dropout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout draws from the global RNG; a resumed epoch must draw the same masks."""
    cfg = OptimConfig(epochs=3, batch_size=16, lr=1e-2)

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5), nn.Linear(32, 3))

    assert_resumes_exactly(tmp_path, monkeypatch, lambda folder: run_phase(folder, cfg, model))


def test_teacher_loaded_from_user_checkpoint(tmp_path: Path, digits_bundle: Path) -> None:
    full = load_file(str(digits_bundle / "full.safetensors"))
    torch.save({"state_dict": full}, tmp_path / "teacher.pt")
    recipe = load_recipe(
        "digits",
        [*SHORT, f"teacher.checkpoint='{tmp_path / 'teacher.pt'}'", "distill.finetune.epochs=0"],
    )
    manifest = build_bundle(recipe, load_data("digits"), tmp_path / "b")
    assert manifest.teacher_accuracy == read_manifest(digits_bundle).teacher_accuracy
    # Nothing was trained for the teacher, so no teacher phase was checkpointed.
    assert not (tmp_path / "b" / "checkpoint" / "teacher.safetensors").exists()
    assert (tmp_path / "b" / "checkpoint" / "head.safetensors").exists()


class _NotAStateDict:
    pass


@pytest.mark.parametrize("kind", ["missing", "pickled-object", "wrong-keys", "corrupt"])
def test_bad_teacher_checkpoint_is_a_recipe_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / ("t.safetensors" if kind == "corrupt" else "t.pt")
    if kind == "pickled-object":
        torch.save({"state_dict": _NotAStateDict()}, path)
    elif kind == "wrong-keys":
        torch.save({"conv.weight": torch.zeros(1)}, path)
    elif kind == "corrupt":
        path.write_bytes(b"\x00" * 32)
    recipe = load_recipe("digits", [*SHORT, f"teacher.checkpoint='{path}'"])
    with pytest.raises(RecipeError, match=str(path)):
        build_bundle(recipe, load_data("digits"), tmp_path / "b")


def test_fine_tuning_keeps_the_encoder_and_rate_points_the_tables_describe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With rate points, fine-tuning trains decoder and tail only: the encoder, the gains and
    the priors leave it bit for bit as they entered, so the exported tables describe what the
    device sends."""
    from tandem.train import Distiller

    recipe = load_recipe(
        "digits",
        ["teacher.train.epochs=1", "distill.head.epochs=1", "distill.finetune.epochs=1",
         "rate.betas=[0.1]"],
    )  # fmt: skip
    before: dict[str, dict[str, torch.Tensor]] = {}
    original = Distiller._finetune

    def spy(self: Distiller, encoder: Any, cloud: Any, logits: Any, rates: Any) -> None:
        before["encoder"] = {k: v.clone() for k, v in encoder.state_dict().items()}
        before["rates"] = {k: v.clone() for k, v in rates.state_dict().items()}
        before["cloud"] = {k: v.clone() for k, v in cloud.state_dict().items()}
        original(self, encoder, cloud, logits, rates)

    monkeypatch.setattr(Distiller, "_finetune", spy)
    distiller = Distiller(recipe, load_data("digits"), tmp_path, fresh=True, progress=False)
    trained = distiller.student(distiller.teacher())
    assert trained.rates is not None
    for name, module in (("encoder", trained.encoder), ("rates", trained.rates)):
        after = module.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before[name].items()), name
    changed = trained.cloud_tail.state_dict()
    assert any(not torch.equal(changed[k], v) for k, v in before["cloud"].items())


def test_end_to_end_fine_tuning_trains_encoder_and_rate_points(
    tmp_path: Path,
) -> None:
    """With ``rate.end_to_end``, fine-tuning also trains encoder, gains and priors (on the task
    loss + β · bits), where without it they stay as head distillation left them."""
    from tandem.train import Distiller

    overrides = ["teacher.train.epochs=1", "distill.head.epochs=1", "distill.finetune.epochs=1",
                 "rate.betas=[0.1]"]  # fmt: skip
    data = load_data("digits")
    trained = {}
    for e2e in (False, True):
        recipe = load_recipe("digits", [*overrides, f"rate.end_to_end={str(e2e).lower()}"])
        distiller = Distiller(recipe, data, tmp_path / str(e2e), fresh=True, progress=False)
        trained[e2e] = distiller.student(distiller.teacher())
    frozen, e2e = trained[False], trained[True]
    assert frozen.rates is not None and e2e.rates is not None
    for name in ("encoder", "rates"):
        a, b = getattr(frozen, name).state_dict(), getattr(e2e, name).state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point()), name


def test_a_black_fill_pads_with_the_given_value() -> None:
    # Inputs are normalised: black is -mean/std per channel, not 0.
    x = torch.full((32, 2, 5, 5), 3.0)
    black = torch.tensor([-1.0, -2.0])
    y = random_shift(x, 2, torch.Generator().manual_seed(0), fill=black)
    assert set(torch.unique(y[:, 0]).tolist()) == {-1.0, 3.0}
    assert set(torch.unique(y[:, 1]).tolist()) == {-2.0, 3.0}
    assert torch.equal(random_shift(x, 2, torch.Generator().manual_seed(0), fill=None).unique(),
                       torch.tensor([3.0]))  # fmt: skip  # edge fill repeats the border


def test_augment_flips_about_half_the_images_left_to_right() -> None:
    cfg = TeacherConfig.model_validate(
        {"arch": {"name": "mlp"}, "train": {"epochs": 1, "lr": 0.1}, "augment_flip": True}
    )
    x = torch.randn(200, 1, 4, 6)
    y = augment(x, cfg, torch.zeros(1), torch.Generator().manual_seed(0))
    same = [bool(torch.equal(a, b)) for a, b in zip(y, x, strict=True)]
    flipped = [bool(torch.equal(a, b.flip(-1))) for a, b in zip(y, x, strict=True)]
    assert all(s or f for s, f in zip(same, flipped, strict=True))
    assert 60 < sum(flipped) < 140
    again = augment(x, cfg, torch.zeros(1), torch.Generator().manual_seed(0))
    assert torch.equal(y, again)  # seeded: a resumed epoch repeats itself
    plain = cfg.model_copy(update={"augment_flip": False})
    assert torch.equal(augment(x, plain, torch.zeros(1), torch.Generator()), x)


def test_augment_fill_must_be_edge_or_black() -> None:
    with pytest.raises(ValidationError):
        TeacherConfig.model_validate(
            {"arch": {"name": "mlp"}, "train": {"epochs": 1, "lr": 0.1}, "augment_fill": "mirror"}
        )


def test_channels_last_trains_the_teacher_in_that_layout_and_saves_the_usual_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layouts = []
    original = PhaseRunner.run

    def spy(self: PhaseRunner, phase: str, cfg: Any, modules: Any, n: int, loss: Any) -> None:
        if phase == "teacher":
            convs = [m for m in modules["teacher"].modules() if isinstance(m, nn.Conv2d)]
            conv = next(m for m in convs if m.in_channels > 1 and m.kernel_size[0] > 1)
            w = conv.weight
            layouts.append(
                w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
            )
        original(self, phase, cfg, modules, n, loss)

    monkeypatch.setattr(PhaseRunner, "run", spy)
    recipe = load_recipe("digits", [*SHORT, "teacher.channels_last=true"])
    build_bundle(recipe, load_data("digits"), tmp_path / "b")
    assert layouts == [True]
    assert read_manifest(tmp_path / "b").teacher_accuracy > 0.5  # it learned, and was saved


def test_targets_are_cached_rows_or_computed_for_the_batch() -> None:
    model = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    cached = Targets(model, model(x).detach().half())
    fresh = Targets(model, None)
    rows = torch.tensor([4, 1])
    torch.testing.assert_close(cached(rows, x[rows]), model(x[rows]).detach(), atol=1e-2, rtol=0)
    flipped = -x[rows]  # an "augmented" batch: only fresh targets follow it
    torch.testing.assert_close(fresh(rows, flipped), model(flipped).detach())
    assert not fresh(rows, flipped).requires_grad


def test_student_phases_can_see_the_teachers_augmentation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With distill.augment the student phases train on augmented batches, with the teacher's
    targets computed for each one (nothing cached); without, on the images as they are."""
    seen: list[bool] = []
    real = Targets.__init__

    def spy(self: Targets, model: nn.Module, cached: torch.Tensor | None) -> None:
        seen.append(cached is None)
        real(self, model, cached)

    monkeypatch.setattr(Targets, "__init__", spy)
    calls: list[int] = []
    real_augment = train_module.augment

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return real_augment(*args, **kwargs)

    monkeypatch.setattr(train_module, "augment", counted)
    sets = [*SHORT, "teacher.augment_shift=1", "distill.finetune.epochs=1"]
    recipe, data = load_recipe("digits", sets), load_data("digits")

    def steps(cfg: OptimConfig) -> int:
        return cfg.epochs * -(-len(data.train) // cfg.batch_size)

    teacher = steps(recipe.teacher.train)
    student = steps(recipe.distill.head) + steps(recipe.distill.finetune)
    plain = build_bundle(recipe, data, tmp_path / "a")
    assert seen == [False, False] and len(calls) == teacher  # the teacher's steps only
    seen.clear(), calls.clear()
    recipe = load_recipe("digits", [*sets, "distill.augment=true"])
    augmented = build_bundle(recipe, data, tmp_path / "b")
    assert seen == [True, True] and len(calls) == teacher + student  # and each student step
    assert plain.table != augmented.table


def test_sgd_phases_resume_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SGD with Nesterov momentum, as photographs' teachers train: its momentum is
    checkpointed, so a resumed run ends with an uninterrupted one's weights."""
    cfg = OptimConfig(epochs=3, batch_size=16, lr=0.1, optimizer="sgd", weight_decay=5e-4)

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    assert_resumes_exactly(tmp_path, monkeypatch, lambda folder: run_phase(folder, cfg, model))
    assert isinstance(make_optimizer(cfg, list(model().parameters())), torch.optim.SGD)


class _Stop(Exception):
    """Raised by a spy to end a run once it has seen what it came for."""


def _first_head_loss(
    tmp_path: Path, teacher: nn.Module, distortion: str, monkeypatch: pytest.MonkeyPatch
) -> float:
    """The head phase's loss on the first 64 training digits, before any step, with
    ``rate.distortion`` set to ``distortion`` (and no rate points: distortion only)."""
    from tandem.data import Batch, normalize
    from tandem.train import Distiller

    recipe = load_recipe("digits", ["teacher.train.epochs=1", f"rate.distortion='{distortion}'"])
    data = load_data("digits")
    distiller = Distiller(recipe, data, tmp_path / distortion, fresh=True, progress=False)
    rows = torch.arange(64)
    x = normalize(data.train.take(rows.numpy()), distiller.mean, distiller.std)
    batch = Batch(rows, x, torch.as_tensor(data.train.y[:64]))
    seen: list[float] = []

    def spy(self: PhaseRunner, phase: str, cfg: Any, modules: Any, n: int, loss: Any) -> None:
        if phase == "head":
            seen.append(loss(batch, torch.Generator().manual_seed(0)).item())
            raise _Stop

    monkeypatch.setattr(PhaseRunner, "run", spy)
    with pytest.raises(_Stop):
        distiller.student(teacher)
    return seen[0]


def test_relative_distortion_is_the_mse_over_the_teachers_feature_variance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rate.distortion = "relative"`` divides the head phase's MSE by the variance of the
    teacher's features at the cut, so a β weighs bits against the same share of the
    features whatever the teacher's scale."""
    from tandem.data import normalize
    from tandem.split import split_model
    from tandem.train import Distiller

    # Fewer than the training split holds, so the sample's cap is exercised too.
    monkeypatch.setattr(train_module, "VARIANCE_SAMPLE", 100)
    recipe = load_recipe("digits", ["teacher.train.epochs=1"])
    data = load_data("digits")
    teacher = Distiller(recipe, data, tmp_path / "t", fresh=True, progress=False).teacher()
    plain = _first_head_loss(tmp_path, teacher, "mse", monkeypatch)
    relative = _first_head_loss(tmp_path, teacher, "relative", monkeypatch)
    rows = torch.arange(100).numpy()
    stats = Distiller(recipe, data, tmp_path / "s", fresh=True, progress=False)
    x = normalize(data.train.take(rows), stats.mean, stats.std)
    with torch.no_grad():
        variance = float(split_model(teacher, recipe.cut).head.eval()(x).var())
    assert variance != pytest.approx(1.0, abs=0.05)  # else the test could not tell them apart
    assert relative == pytest.approx(plain / variance, rel=1e-4)
