"""ssl4ecg without its optional packages and without being pip-installed (a bare GPU host).

* ``Recipe.to_toml`` works without ``tomli_w`` (a built-in writer for the recipe's value types);
* nothing imports ``wfdb`` or ``tomli_w`` at module level;
* without the package's distribution metadata the built-in plugins listed in pyproject.toml
  are loaded from the source tree.
"""

from __future__ import annotations

import importlib.metadata
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ssl4ecg.recipe as recipe_module
import ssl4ecg.registry as registry_module
from ssl4ecg.errors import ConfigError
from ssl4ecg.hooks import PluginLoadWarning
from ssl4ecg.recipe import dumps_toml, load_recipe, parse_recipe, resolve, tomllib
from ssl4ecg.registry import builtin_plugin_modules, collect, get_registry

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.toml"))


@pytest.fixture(params=["tomli_w", "builtin"])
def writer(request, monkeypatch):
    """Run the test with tomli_w (when installed) and with the built-in writer."""
    if request.param == "builtin":
        monkeypatch.setattr(recipe_module, "tomli_w", None)
    elif recipe_module.tomli_w is None:
        pytest.skip("tomli_w is not installed")
    return request.param


def _same(a, b) -> bool:
    """Equality that treats nan as equal to nan."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


DOC = {
    "run": {"name": "weird \"name\" \\ with\ttabs\nand newlines \u00e9\u4e2d", "seed": -3, "flag": True, "off": False},
    "train": {"lr": 5e-05, "nan": float("nan"), "inf": float("inf"), "ninf": float("-inf"), "big": 1e300,
              "tiny": 2.5e-310, "zero": 0.0, "neg": -0.0, "betas": [0.9, 0.999], "empty": []},
    "data": {"leads": ["I", "II"], "nested": [[1, 2], [3.5]], "mixture": [{"cache": "a", "weight": 1.0},
                                                                            {"cache": "b", "weight": 2.5}],
             "inline": [1, {"k": "v"}], "sub": {"deeper": {"x": 1}, "y": "z"},
             "key with space": 1, "dotted.key": 2, "": 3, "ctrl\x01": "\x7f\x1f"},
    "eval": [{"name": "linear_probe", "options": {"c": [1, 2]}, "runs": [{"seed": 1}, {"seed": 2}]},
             {"name": "knn", "k": 5}],
}


def test_dumps_toml_round_trips_every_recipe_value_type(writer):
    assert _same(tomllib.loads(dumps_toml(DOC)), DOC)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_round_trips(writer, path):
    recipe = load_recipe(path)
    assert tomllib.loads(recipe.to_toml()) == recipe.to_dict()


def test_resolved_recipe_round_trips_without_tomli_w(monkeypatch):
    monkeypatch.setattr(recipe_module, "tomli_w", None)
    resolved = resolve(load_recipe(REPO / "recipes" / "quickstart.toml"), get_registry())
    again = resolve(parse_recipe(resolved.to_toml()), get_registry())
    assert again.to_dict() == resolved.to_dict()


def test_builtin_writer_rejects_values_toml_cannot_hold(monkeypatch):
    monkeypatch.setattr(recipe_module, "tomli_w", None)
    with pytest.raises(ConfigError, match=r"train\.when = .*cannot be written as TOML"):
        dumps_toml({"train": {"when": object()}})
    with pytest.raises(ConfigError, match="TOML keys must be strings"):
        dumps_toml({"train": {1: 2}})


_keys = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)
_scalars = (st.text(st.characters(blacklist_categories=("Cs",)), max_size=8) | st.booleans()
            | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=True, allow_infinity=True))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(_keys, inner, max_size=3), max_leaves=8)
_tables = st.recursive(st.dictionaries(_keys, _values, max_size=4),
                       lambda inner: st.dictionaries(_keys, inner | st.lists(inner, min_size=1, max_size=2),
                                                     max_size=3), max_leaves=6)


@settings(max_examples=150, deadline=None)
@given(_tables)
def test_builtin_writer_round_trips_arbitrary_documents(doc):
    original = recipe_module.tomli_w
    recipe_module.tomli_w = None
    try:
        text = dumps_toml(doc)
    finally:
        recipe_module.tomli_w = original
    assert _same(tomllib.loads(text), doc), text


def test_whole_package_imports_with_wfdb_and_tomli_w_blocked():
    code = (
        "import importlib, pkgutil, sys\n"
        "sys.modules['wfdb'] = None\nsys.modules['tomli_w'] = None\n"
        f"sys.path.insert(0, {str(REPO / 'plugins')!r})\n"
        "import ssl4ecg\n"
        "names = [m.name for m in pkgutil.walk_packages(ssl4ecg.__path__, 'ssl4ecg.')]\n"
        f"for p in sorted(__import__('pathlib').Path({str(REPO / 'plugins')!r}).glob('*/__init__.py')):\n"
        "    mod = importlib.import_module(p.parent.name)\n"
        "    names += [p.parent.name] + [m.name for m in pkgutil.walk_packages(mod.__path__, p.parent.name + '.')]\n"
        "for n in names:\n"
        "    if not n.endswith('__main__'):\n"
        "        importlib.import_module(n)\n"
        "from ssl4ecg.recipe import load_recipe\n"
        f"print(len(names), load_recipe({str(REPO / 'recipes' / 'quickstart.toml')!r}).to_toml().count('['))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    modules, tables = map(int, done.stdout.split())
    assert modules > 50 and tables >= 7


def _hide_installation(monkeypatch):
    """Make ssl4ecg look not pip-installed: no distribution metadata, no entry points."""
    real_distribution, real_entry_points = importlib.metadata.distribution, importlib.metadata.entry_points

    def distribution(name):
        if name == "ssl4ecg":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    def entry_points(**params):
        if params.get("group") == "ssl4ecg":
            return importlib.metadata.EntryPoints(())
        return real_entry_points(**params)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_uninstalled_source_tree_loads_the_builtin_plugins_from_pyproject(monkeypatch):
    _hide_installation(monkeypatch)
    expected = {"ssl4ecg_jepa", "ssl4ecg_stmem", "ssl4ecg_simclr", "ssl4ecg_cmsc", "ssl4ecg_cpc", "ssl4ecg_vqvae",
                "ssl4ecg_hybrid", "ssl4ecg_triplet"}
    assert set(builtin_plugin_modules()) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no plugin may fail to load
        registry = collect()
    assert {"jepa", "stmem", "simclr", "cmsc", "cpc", "vqvae"} <= set(registry.names("objective"))
    assert "cropa_vit" in registry.names("encoder")
    assert registry.get("objective", "jepa").package == "ssl4ecg_jepa"


def test_installed_package_uses_only_its_entry_points():
    if not importlib.metadata.entry_points(group="ssl4ecg"):
        pytest.skip("ssl4ecg is not installed here")
    assert builtin_plugin_modules() == []
    assert get_registry().get("objective", "jepa").package.startswith("ssl4ecg ")


def test_uninstalled_plugin_that_fails_to_import_is_skipped_with_a_hint(monkeypatch):
    _hide_installation(monkeypatch)
    monkeypatch.setattr(registry_module, "builtin_plugin_modules", lambda: ["ssl4ecg_no_such_plugin"])
    hint = r"'ssl4ecg_no_such_plugin' failed to load.*plugins/ folder on PYTHONPATH"
    with pytest.warns(PluginLoadWarning, match=hint):
        registry = collect()
    assert "jepa" not in registry.names("objective")
    assert "linear_probe" in registry.names("evaluator")  # the core still registers

