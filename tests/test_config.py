"""Recipes: built-ins load, overrides apply, bad input gives a clear RecipeError."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.config import RecipeError, apply_override, builtin_recipes, load_recipe, parse_value


def test_builtin_recipes_are_listed_and_valid() -> None:
    assert {"digits", "mnist", "cifar10"} <= set(builtin_recipes())
    for name in builtin_recipes():
        assert load_recipe(name).name == name


@pytest.mark.parametrize(
    ("name", "shape", "head_share"),
    [("mnist", (1, 28, 28), 0.2), ("cifar10", (3, 32, 32), 0.2)],
)
def test_builtin_shapes_fit_and_heads_stay_light(
    name: str, shape: tuple[int, int, int], head_share: float
) -> None:
    """The decoder rebuilds the cut's tensor from the code, and the device's encoder costs at
    most ``head_share`` of the teacher's FLOPs (CIFAR-10's target is 0.2)."""
    import torch

    from tandem.bottleneck import build_bottleneck
    from tandem.models import build_model
    from tandem.profile import model_flops
    from tandem.split import split_model

    r = load_recipe(name)
    teacher = build_model(r.teacher.arch.name, num_classes=10, in_channels=shape[0],
                          **r.teacher.arch.args).eval()  # fmt: skip
    x = torch.zeros(1, *shape)
    cut = split_model(teacher, r.cut).head(x)
    b = r.bottleneck
    encoder, decoder = build_bottleneck(shape[0], cut.shape[1], b.channels, b.widths,
                                        b.encoder, b.decoder)  # fmt: skip
    with torch.no_grad():
        assert decoder.eval()(encoder.eval()(x)).shape == cut.shape
    assert model_flops(encoder, shape) / model_flops(teacher, shape) <= head_share


def test_override_parses_toml_literals() -> None:
    recipe = load_recipe(
        "digits", ["teacher.train.epochs=7", "bottleneck.widths=[0.5, 1.0]", "seed=3"]
    )
    assert recipe.teacher.train.epochs == 7
    assert recipe.bottleneck.widths == [0.5, 1.0]
    assert recipe.seed == 3


def test_parse_value_falls_back_to_string() -> None:
    assert parse_value("true") is True
    assert parse_value("1e-3") == pytest.approx(1e-3)
    assert parse_value("layer3") == "layer3"


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(RecipeError, match="teacher"):
        load_recipe("digits", ["teacher.epochz=3"])


def test_bad_assignment_and_non_table() -> None:
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        load_recipe("digits", ["seed"])
    raw = {"seed": 1}
    with pytest.raises(RecipeError, match="not a table"):
        apply_override(raw, "seed.x=2")


def test_invalid_values_are_rejected() -> None:
    with pytest.raises(RecipeError):
        load_recipe("digits", ["bottleneck.widths=[0.0, 2.0]"])
    with pytest.raises(RecipeError):
        load_recipe("digits", ["distill.quant_bits=[3]"])


def test_recipe_from_path_and_missing(tmp_path: Path) -> None:
    from importlib import resources

    text = (resources.files("tandem.recipes") / "digits.toml").read_text()
    path = tmp_path / "mine.toml"
    path.write_text(text.replace('name = "digits"', 'name = "mine"'))
    assert load_recipe(str(path)).name == "mine"
    with pytest.raises(RecipeError, match="no recipe"):
        load_recipe(str(tmp_path / "absent.toml"))
    (tmp_path / "broken.toml").write_text("name = ")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(str(tmp_path / "broken.toml"))


def test_fingerprint_tracks_content() -> None:
    a, b = load_recipe("digits"), load_recipe("digits", ["seed=1"])
    assert a.fingerprint() == load_recipe("digits").fingerprint()
    assert a.fingerprint() != b.fingerprint()


@pytest.mark.parametrize(
    "override",
    [
        "default_bits=3",
        "eval_bits=[5, 5]",
        "eval_bits=[8, 2]",  # the default of 4 bits would go unmeasured
        "distill.quant_bits=[]",
        "bottleneck.widths=[0.25, 0.3]",  # both are 2 of 8 channels
        "bottleneck.encoder=[[16, 0]]",
        "bottleneck.decoder=[[32, -1]]",
        # The entropy codec's header has room for 8 rate points.
        "rate.betas=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]",
        "rate.betas=[0.1, 0.1]",
        "rate.distortion='l1'",
    ],
)
def test_values_that_would_fail_late_are_rejected_early(override: str) -> None:
    with pytest.raises(RecipeError):
        load_recipe("digits", [override])


def test_set_has_one_grammar_for_train_and_fed_simulate() -> None:
    from tandem.federated.cli import parse_settings

    # A quoted TOML string, an array, and either spelling of a key mean the same in both.
    recipe = load_recipe("digits", ["name='my digits'", "eval-bits=[8, 4]", "default_bits=8"])
    assert (recipe.name, recipe.eval_bits, recipe.default_bits) == ("my digits", [8, 4], 8)
    assert parse_settings(["adapter-name='my-adapter'", "num_rounds=3", "domains=rotate:35"]) == {
        "adapter-name": "my-adapter", "num-rounds": 3, "domains": "rotate:35",
    }  # fmt: skip


def test_keys_at_their_defaults_leave_the_fingerprint_alone() -> None:
    """A key added later, at the default that keeps the old behaviour, must not make the
    runs of earlier versions unresumable; any other value must."""
    base = load_recipe("digits").fingerprint()
    defaults = ["precision='fp32'", "distill.augment=false"]
    assert load_recipe("digits", defaults).fingerprint() == base
    assert load_recipe("digits", ["precision='bf16'"]).fingerprint() != base
    assert load_recipe("digits", ["distill.augment=true"]).fingerprint() != base
