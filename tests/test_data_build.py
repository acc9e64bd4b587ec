"""The [data] section: defaults, validation with suggestions, loading, mixtures and pretraining loaders."""

from __future__ import annotations

import numpy as np
import pytest

from ssl4ecg.data.build import (
    DATA_DEFAULTS, load_mixture, load_records, pretrain_loader, prepare, resolve_data_section,
)
from ssl4ecg.data.loader import BatchLoader, MixtureLoader
from ssl4ecg.data.sources import register
from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import JEPA_LEADS
from ssl4ecg.registry import Registry


@pytest.fixture(scope="module")
def registry():
    reg = Registry()
    register(reg)
    return reg


def test_defaults_cover_the_framework_keys():
    assert DATA_DEFAULTS["source"] == "synthetic" and DATA_DEFAULTS["sampling_rate"] == 250.0
    assert DATA_DEFAULTS["leads"] == list(JEPA_LEADS) and DATA_DEFAULTS["bandpass"] == []
    assert DATA_DEFAULTS["normalize"] == "none" and DATA_DEFAULTS["crop"] == "start"
    assert DATA_DEFAULTS["pretrain_splits"] == ["train", "val"] and DATA_DEFAULTS["mixture"] == []
    for key in ("path", "cache", "seconds", "derive_leads"):
        assert key in DATA_DEFAULTS


def test_unknown_key_gets_a_suggestion(registry):
    with pytest.raises(ConfigError, match=r"\[data\] unknown key 'sampling_rat' .*Did you mean 'sampling_rate'\?"):
        resolve_data_section({"sampling_rat": 250}, registry)
    with pytest.raises(ConfigError, match=r"unknown key 'tsk' for source 'ptbxl'.*Did you mean 'task'\?"):
        resolve_data_section({"source": "ptbxl", "tsk": "rhythm"}, registry)
    # a key of another source is not valid for this one
    with pytest.raises(ConfigError, match="unknown key 'label_map' for source 'ptbxl'"):
        resolve_data_section({"source": "ptbxl", "label_map": "cpsc2018"}, registry)
    with pytest.raises(ConfigError, match="no source named 'ptbx'.*Did you mean 'ptbxl'"):
        resolve_data_section({"source": "ptbx"}, registry)


def test_values_are_checked(registry):
    with pytest.raises(ConfigError, match="'seconds' should be float"):
        resolve_data_section({"seconds": "ten"}, registry)
    with pytest.raises(ConfigError, match="Did you mean 'lead'"):
        resolve_data_section({"normalize": "leads"}, registry)
    with pytest.raises(ConfigError, match="pretrain_splits"):
        resolve_data_section({"pretrain_splits": ["training"]}, registry)
    with pytest.raises(ConfigError, match="takes no path"):
        resolve_data_section({"source": "synthetic", "path": "/data"}, registry)
    with pytest.raises(ConfigError, match="mixture entry 1: unknown key 'wieght'.*Did you mean 'weight'"):
        resolve_data_section({"mixture": [{"cache": "x", "wieght": 2}]}, registry)
    with pytest.raises(ConfigError, match="cache and mixture exclude each other"):
        resolve_data_section({"cache": "a", "mixture": [{"cache": "b"}]}, registry)


def test_resolved_section_is_complete_and_stable(registry):
    resolved = resolve_data_section({"source": "ptbxl", "path": "/x", "leads": ["d1", "AVF"]}, registry)
    assert set(DATA_DEFAULTS) <= set(resolved)
    assert resolved["leads"] == ["I", "aVF"]  # canonical spelling saved
    assert resolved["task"] == "superdiagnostic" and resolved["val_folds"] == [9]
    assert resolve_data_section(resolved, registry) == resolved  # resolving twice changes nothing
    synthetic = resolve_data_section({"n_records": 60}, registry)
    assert synthetic["n_records"] == 60 and synthetic["sampling_rate"] == 250.0


def test_synthetic_source_goes_through_the_same_preprocessing(registry):
    records = load_records({"source": "synthetic", "n_records": 40, "seconds": 4.0, "normalize": "lead",
                            "leads": ["II", "V1", "aVR"]}, registry)
    assert records.signals.shape == (40, 3, 1000) and records.sampling_rate == 250.0
    assert records.leads == ("II", "V1", "aVR") and records.labels.shape[1] == 5
    np.testing.assert_allclose(records.signals.std(axis=2), 1, atol=1e-3)
    assert "heart_rate" in records.extra and np.isfinite(records.extra["heart_rate"]).all()
    assert {"train", "val", "test"} == set(records.splits)
    order = [{"train": 0, "val": 1, "test": 2}[s] for s in records.splits]
    assert order == sorted(order)  # records come ordered by split


def test_pretrain_loader_uses_pretrain_splits(registry):
    loader = pretrain_loader({"source": "synthetic", "n_records": 60, "seconds": 4.0,
                              "pretrain_splits": ["train"]}, registry, 8, seed=1, crop_samples=800)
    assert isinstance(loader, BatchLoader)
    train = np.flatnonzero(loader.records.splits == "train")
    assert loader.n_records == len(train) and loader.spec.n_samples == 800
    seen = {i for b in loader for i in b.record_ids}
    assert seen <= set(loader.records.record_ids[train])


def test_mixture_of_caches(registry, tmp_path):
    for name, n in (("a", 30), ("b", 50)):
        section = resolve_data_section({"source": "synthetic", "n_records": n, "seed": len(name) + n,
                                        "seconds": 4.0}, registry)
        prepare(section, registry, tmp_path / name, workers=1)
    mixture = [{"cache": str(tmp_path / "a"), "weight": 1.0}, {"cache": str(tmp_path / "b"), "weight": 3}]
    resolved = resolve_data_section({"mixture": mixture}, registry)
    assert resolved["seconds"] == 4.0  # inherited from the first cache
    assert resolved["source"] == "mixture" and resolve_data_section(resolved, registry) == resolved
    parts = load_mixture({"mixture": mixture}, registry)
    assert [len(rs) for rs, _ in parts] == [30, 50] and [w for _, w in parts] == [1.0, 3.0]
    loader = pretrain_loader({"mixture": mixture}, registry, 8, seed=0)
    assert isinstance(loader, MixtureLoader) and loader.spec.n_samples == 1000
    batch = next(iter(loader))
    assert batch.signal.shape == (8, 8, 1000) and "mixture_part" in batch.extra
    with pytest.raises(ConfigError, match="load them with ssl4ecg.data.build.load_mixture"):
        load_records({"mixture": mixture}, registry)
    with pytest.raises(ConfigError, match="unknown key 'n_records'"):
        resolve_data_section({"mixture": mixture, "n_records": 3}, registry)
