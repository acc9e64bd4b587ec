"""Property-based fuzzing of recipe parsing: random, truncated and malformed recipes.

Every input ends in a parsed recipe or a ConfigError with a message -- never another
exception, never a hang. The example budget and seed are fixed so CI is reproducible.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from ssl4ecg.errors import ConfigError
from ssl4ecg.recipe import apply_override, parse_recipe, resolve
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
