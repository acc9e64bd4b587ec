"""Recipe parsing, --set overrides, defaults and the closest-key suggestions."""

from __future__ import annotations

import pytest

from ssl4ecg.errors import ConfigError
from ssl4ecg.recipe import TRAIN_DEFAULTS, apply_override, load_recipe, parse_recipe, parse_value, resolve
from ssl4ecg.registry import get_registry

BASE = """
[run]
name = "t"
[data]
source = "synthetic"
n_records = 40
[encoder]
name = "cropa_vit"
dim = 32
depth = 1
heads = 2
[objective]
name = "jepa"
[masker]
name = "multiblock"
[train]
epochs = 1
[[eval]]
name = "linear_probe"
"""


def test_unknown_train_key_names_it_and_suggests():
    with pytest.raises(ConfigError) as err:
        parse_recipe(BASE.replace("epochs = 1", "epohcs = 1"))
    assert "unknown key 'epohcs'" in str(err.value)
    assert "Did you mean 'epochs'?" in str(err.value)


def test_unknown_section_suggests():
    with pytest.raises(ConfigError, match=r"unknown section \[trian\].*Did you mean 'train'"):
        parse_recipe(BASE + "\n[trian]\nepochs = 2\n")


def test_unknown_component_key_is_caught_by_resolve_with_suggestion():
    recipe = parse_recipe(BASE.replace("depth = 1", "dpeth = 1"))
    with pytest.raises(ConfigError) as err:
        resolve(recipe, get_registry())
    assert "[encoder] unknown key 'dpeth'" in str(err.value)
    assert "Did you mean 'depth'?" in str(err.value)


def test_unknown_data_key_suggests():
    recipe = parse_recipe(BASE.replace("n_records = 40", "sampling_rat = 100.0"))
    with pytest.raises(ConfigError, match="Did you mean 'sampling_rate'"):
        resolve(recipe, get_registry())


def test_unknown_component_name_suggests():
    recipe = parse_recipe(BASE.replace('name = "multiblock"', 'name = "multiblok"'))
    with pytest.raises(ConfigError, match="no masker named 'multiblok'.*Did you mean 'multiblock'"):
        resolve(recipe, get_registry())


def test_wrong_type_is_reported():
    with pytest.raises(ConfigError, match="'batch_size' should be int"):
        parse_recipe(BASE.replace("epochs = 1", 'batch_size = "big"'))


def test_bad_choice_is_reported():
    with pytest.raises(ConfigError, match="precision = 'bf61' is not one of"):
        parse_recipe(BASE.replace("epochs = 1", 'precision = "bf61"'))


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\nepochs = 1")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_recipe(path)


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe("no/such/recipe.toml")


def test_overrides(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(BASE)
    recipe = load_recipe(path, ["train.max_steps=0", "encoder.dim=64", "data.leads=['I','II']",
                                "eval.0.epochs=3", "run.name=renamed"])
    assert recipe.train["max_steps"] == 0
    assert recipe.encoder["dim"] == 64
    assert recipe.data["leads"] == ["I", "II"]
    assert recipe.evals[0]["epochs"] == 3
    assert recipe.run["name"] == "renamed"


@pytest.mark.parametrize("item,message", [
    ("train.max_steps", "expected section.key=value"),
    ("trian.max_steps=1", "Did you mean 'train'"),
    ("eval.x.epochs=1", "eval.N.key=value"),
    ("eval.5.epochs=1", "has 1 \\[\\[eval\\]\\] entries"),
])
def test_bad_overrides(item, message):
    raw = {"eval": [{"name": "linear_probe"}]}
    with pytest.raises(ConfigError, match=message):
        apply_override(raw, item)


def test_parse_value_types():
    assert parse_value("3") == 3
    assert parse_value("2.5e-4") == 2.5e-4
    assert parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("ptbxl") == "ptbxl"
    assert parse_value("../shared/data/ptbxl-mini") == "../shared/data/ptbxl-mini"


def test_resolve_fills_defaults_and_round_trips():
    resolved = resolve(parse_recipe(BASE), get_registry())
    assert resolved.train["batch_size"] == TRAIN_DEFAULTS["batch_size"]
    assert resolved.encoder["patch_size"] == 50  # a component default written out
    assert resolved.masker["n_blocks"] == 4
    again = resolve(parse_recipe(resolved.to_toml()), get_registry())
    assert again.to_dict() == resolved.to_dict()


def test_duplicate_eval_ids_are_rejected():
    recipe = parse_recipe(BASE + '\n[[eval]]\nname = "linear_probe"\nid = "linear_probe"\n')
    with pytest.raises(ConfigError, match="share an id"):
        resolve(recipe, get_registry())


def test_every_shipped_recipe_resolves():
    from pathlib import Path

    registry = get_registry()
    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        resolve(load_recipe(path), registry)
