"""Property-based fuzzing of recipe parsing: random, truncated and malformed recipes.

Every input ends in a parsed recipe or a ConfigError with a message -- never another
exception, never a hang. The example budget and seed are fixed so CI is reproducible.
"""

from __future__ import annotations

import math
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from ssl4ecg.errors import ConfigError
from ssl4ecg.recipe import VALUE_RULES, apply_override, parse_recipe, recipe_from_dict, resolve
from ssl4ecg.registry import get_registry

QUICKSTART = (Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml").read_text()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

toml_scalars = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False, width=32),
                         st.booleans(), st.text(max_size=12), st.lists(st.integers(-5, 5), max_size=3))
keys = st.sampled_from(["name", "seed", "epochs", "batch_size", "lr", "dim", "depth", "heads", "source", "path",
                        "leads", "sampling_rate", "patch_size", "ratio_min", "precision", "max_steps", "bogus",
                        "n_records", "epohcs"])
sections = st.sampled_from(["run", "data", "encoder", "objective", "masker", "train", "trian", "eval_data"])


def _quiet_resolve(text: str) -> None:
    try:
        recipe = parse_recipe(text, "fuzz.toml")
        resolve(recipe, get_registry())
    except ConfigError as exc:
        assert str(exc)  # a message, naming what is wrong


@seed(20261122)
@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(QUICKSTART)))
def test_truncated_recipes(cut):
    _quiet_resolve(QUICKSTART[:cut])


@seed(20261122)
@FUZZ
@given(data=st.data())
def test_random_byte_flips(data):
    text = list(QUICKSTART)
    for _ in range(data.draw(st.integers(1, 5))):
        i = data.draw(st.integers(0, len(text) - 1))
        text[i] = data.draw(st.sampled_from(list("[]=\"'.,#\n x0")))
    _quiet_resolve("".join(text))


@seed(20261122)
@FUZZ
@given(section=sections, key=keys, value=toml_scalars)
def test_random_key_values(section, key, value):
    import tomli_w

    doc = {"encoder": {"name": "cropa_vit", "dim": 32, "depth": 1, "heads": 2},
           "objective": {"name": "jepa"}, "data": {"source": "synthetic", "n_records": 30}}
    doc.setdefault(section, {})[key] = value
    _quiet_resolve(tomli_w.dumps(doc))


@seed(20261122)
@FUZZ
@given(text=st.text(max_size=60))
def test_random_overrides(text):
    raw = {"eval": [{"name": "linear_probe"}]}
    try:
        apply_override(raw, text)
    except ConfigError as exc:
        assert str(exc)


# ---------------------------------------------------------------------------------------------
# numeric values: every number either passes validation or is one ConfigError, never another
# exception (an OverflowError, a ZeroDivisionError, a MemoryError from building a huge model)

numbers = st.one_of(
    st.integers(-2**70, 2**70), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-1e4, 1e4),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**8, 0.0, -0.0, 1e308, 5e-324, float("nan"), float("inf")]),
    st.booleans(), st.lists(st.floats(allow_nan=True), max_size=3),
)
# [data] magnitudes stay below 1e12: seconds * sampling_rate beyond the float range overflows
# inside ssl4ecg.data.preprocess.Preprocessing (the data layer's own checks)
data_numbers = st.one_of(st.integers(-2**40, 2**40), st.floats(-1e12, 1e12), st.sampled_from([float("nan"), 0.0]))


def _numeric_keys(kind: str, name: str) -> list[str]:
    options = get_registry().get(kind, name).options()
    return sorted(k for k, v in options.items() if isinstance(v, (int, float)) and not isinstance(v, bool))


def _quickstart_doc() -> dict:
    return {"encoder": {"name": "cropa_vit", "dim": 32, "depth": 1, "heads": 2, "patch_size": 50},
            "objective": {"name": "jepa", "predictor_dim": 16, "predictor_depth": 1, "predictor_heads": 2},
            "masker": {"name": "multiblock"}, "data": {"source": "synthetic", "n_records": 30, "sampling_rate": 100.0}}


@seed(20261122)
@FUZZ
@given(key=st.sampled_from(sorted(VALUE_RULES)), value=numbers)
def test_run_and_train_numbers_are_valid_or_one_config_error(key, value):
    section, name = key
    try:
        recipe = recipe_from_dict({section: {name: value}}, "fuzz.toml")
    except ConfigError as exc:
        assert f"[{section}] " in str(exc)
        return
    accepted = getattr(recipe, section)[name]
    items = accepted if isinstance(accepted, list) else [accepted]
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in items)


@seed(20261122)
@FUZZ
@given(data=st.data())
def test_component_and_data_numbers_are_valid_or_one_config_error(data, tmp_path_factory):
    """Values of [encoder], [objective], [masker] and [data] through resolve and the size checks."""
    from ssl4ecg.limits import check_run_resources
    from ssl4ecg.run import Run

    doc = _quickstart_doc()
    section = data.draw(st.sampled_from(["encoder", "objective", "masker", "data"]))
    if section == "data":
        key, value = data.draw(st.sampled_from(["seconds", "sampling_rate", "n_records"])), data.draw(data_numbers)
    else:
        kind_name = doc[section]["name"]
        key = data.draw(st.sampled_from(_numeric_keys(section, kind_name)))
        value = data.draw(numbers)
    doc[section][key] = value
    out = tmp_path_factory.getbasetemp() / "never-created"
    try:
        run = Run(recipe_from_dict(doc, "fuzz.toml"), out, get_registry())
        check_run_resources(run)
    except ConfigError as exc:
        assert str(exc)
    assert not out.exists()  # validation creates nothing
