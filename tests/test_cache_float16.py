"""float16 cache storage (``[data] cache_dtype``): half the file, recorded in the manifest, read
back as float32 batches within float16's rounding; and the [train] loader options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ssl4ecg.data.build import (
    auto_cache_path, load_records, loader_options, prepare, pretrain_loader, resolve_data_section,
)
from ssl4ecg.data.cache import open_cache, prepare_cache, to_storage, verify_cache
from ssl4ecg.data.cli import data_app
from ssl4ecg.data.loader import BatchLoader, MixtureLoader
from ssl4ecg.data.preprocess import Preprocessing
from ssl4ecg.data.records import RecordSet
from ssl4ecg.data.sources import register
from ssl4ecg.errors import ConfigError, DataError
from ssl4ecg.registry import Registry

SYNTHETIC = {"source": "synthetic", "n_records": 48, "seconds": 4.0, "seed": 3}


@pytest.fixture(scope="module")
def registry():
    reg = Registry()
    register(reg)
    return reg


@pytest.fixture(scope="module")
def caches(registry, tmp_path_factory):
    """The same synthetic records prepared as float32 and as float16."""
    root = tmp_path_factory.mktemp("caches")
    out = {}
    for dtype in ("float32", "float16"):
        section = resolve_data_section({**SYNTHETIC, "cache_dtype": dtype}, registry)
        out[dtype] = (root / dtype, prepare(section, registry, root / dtype, workers=2))
    return out


def within_float16(half: np.ndarray, full: np.ndarray) -> bool:
    """|half - full| at most half a float16 ulp (relative 2**-11; 2**-25 below the normal range)."""
    return bool(np.all(np.abs(half.astype(np.float64) - full) <= np.abs(full) * 2.0**-11 + 2.0**-25))


def test_float16_cache_round_trip_manifest_and_size(caches):
    (p32, m32), (p16, m16) = caches["float32"], caches["float16"]
    assert m16["dtype"] == "float16" and m32["dtype"] == "float32"
    assert json.loads((p16 / "manifest.json").read_text())["dtype"] == "float16"
    assert m16["shape"] == m32["shape"] and m16["counts"] == m32["counts"]
    assert m16["plan_hash"] != m32["plan_hash"]
    assert verify_cache(p16) == []
    header = 128  # the .npy header of both files
    size32, size16 = (p32 / "signals.npy").stat().st_size, (p16 / "signals.npy").stat().st_size
    assert size16 - header == (size32 - header) // 2
    r32, _ = open_cache(p32)
    r16, _ = open_cache(p16)
    assert r16.signals.dtype == np.float16 and isinstance(r16.signals, np.memmap)
    full = np.asarray(r32.signals, dtype=np.float64)
    assert within_float16(np.asarray(r16.signals), full)
    assert not np.array_equal(np.asarray(r16.signals, dtype=np.float32), np.asarray(r32.signals))
    assert r16.record_ids.tolist() == r32.record_ids.tolist() and np.array_equal(r16.labels, r32.labels)
    # train statistics describe the stored values
    stats = m16["dataset_stats"]
    train = np.asarray(r16.signals[r16.splits == "train"], dtype=np.float64)
    np.testing.assert_allclose(stats["mean"], train.mean(axis=(0, 2)), rtol=1e-6, atol=1e-9)


def test_loaders_give_float32_batches_from_a_float16_cache(caches):
    r32, _ = open_cache(caches["float32"][0])
    r16, _ = open_cache(caches["float16"][0])
    for kwargs in ({}, {"crop_samples": 700}, {"crop_samples": 700, "crop": "center"}):
        b16 = list(BatchLoader(r16, 8, seed=2, prefetch=0, **kwargs))
        b32 = list(BatchLoader(r32, 8, seed=2, prefetch=0, **kwargs))
        for x, y in zip(b16, b32):
            assert x.signal.dtype == torch.float32 and x.record_ids == y.record_ids
            assert within_float16(x.signal.numpy(), y.signal.numpy().astype(np.float64))
        rows = [int(np.flatnonzero(r16.record_ids == rid)[0]) for rid in b16[0].record_ids]
        if not kwargs:  # exactly the stored float16 values, converted
            assert torch.equal(b16[0].signal, torch.from_numpy(np.asarray(r16.signals[rows], dtype=np.float32)))
    mixed = next(iter(MixtureLoader([r16, r32], [1, 1], 16, seed=0)))
    assert mixed.signal.dtype == torch.float32 and set(mixed.extra["mixture_part"].tolist()) == {0.0, 1.0}


def test_reading_a_float16_cache_through_the_data_section(caches, registry):
    path = str(caches["float16"][0])
    resolved = resolve_data_section({"cache": path}, registry)
    assert resolved["cache_dtype"] == "float16"
    # storage only: another value is ignored (batches are float32 either way)
    assert resolve_data_section({"cache": path, "cache_dtype": "float32"}, registry)["cache_dtype"] == "float16"
    records = load_records({"cache": path}, registry)
    assert records.signals.dtype == np.float16
    normalised = load_records({"cache": path, "normalize": "dataset"}, registry)
    assert normalised.signals.dtype == np.float32
    np.testing.assert_allclose(normalised.signals[records.splits == "train"].mean(axis=(0, 2)), 0.0, atol=1e-4)
    converted = load_records({"cache": path, "sampling_rate": 125.0}, registry)  # resampled in memory
    assert converted.signals.dtype == np.float32 and converted.signals.shape[-1] == 500
    loader = pretrain_loader({"mixture": [{"cache": path}, {"cache": str(caches["float32"][0])}]}, registry, 8)
    assert next(iter(loader)).signal.dtype == torch.float32


def test_cache_dtype_is_checked_and_keys_its_own_caches(registry, tmp_path):
    with pytest.raises(ConfigError, match="cache dtype 'bfloat16' is not one of float32, float16"):
        resolve_data_section({**SYNTHETIC, "cache_dtype": "bfloat16"}, registry)
    with pytest.raises(ConfigError, match="should be str"):
        resolve_data_section({**SYNTHETIC, "cache_dtype": 16}, registry)
    base = resolve_data_section({**SYNTHETIC, "cache_dir": str(tmp_path)}, registry)
    half = resolve_data_section({**SYNTHETIC, "cache_dir": str(tmp_path), "cache_dtype": "float16"}, registry)
    assert auto_cache_path(base, registry) != auto_cache_path(half, registry)
    # a float32 cache is not taken for a float16 one (nor replaced without --force)
    prepare(base, registry, tmp_path / "c", workers=1)
    with pytest.raises(ConfigError, match="prepared with other options"):
        prepare(half, registry, tmp_path / "c", workers=1)
    assert prepare(half, registry, tmp_path / "c", workers=1, force=True)["dtype"] == "float16"
    records = load_records({**SYNTHETIC, "cache_dir": str(tmp_path), "cache_dtype": "float16"}, registry)
    assert records.signals.dtype == np.float16


def test_values_beyond_float16_are_refused_with_the_record(tmp_path):
    signals = np.zeros((4, 2, 300), dtype=np.float32)
    signals[2, 1, 7] = 70000.0
    with pytest.raises(DataError, match=r"record c reaches \|x\| = 70000.*beyond float16's range"):
        to_storage(signals, "float16", ["a", "b", "c", "d"])
    assert to_storage(signals, "float32") is signals
    source = RecordSet(signals=signals, leads=("I", "II"), sampling_rate=100.0, record_ids=np.array(list("abcd")))
    pp = Preprocessing(sampling_rate=100.0, seconds=3.0, leads=("I", "II"))

    class Source:
        def load(self):
            return source

    with pytest.raises(DataError, match="record c reaches"):
        prepare_cache(Source(), "raw", {}, pp, tmp_path / "c", workers=1, dtype="float16")
    assert prepare_cache(Source(), "raw", {}, pp, tmp_path / "d", workers=1)["dtype"] == "float32"


def test_cli_prepares_and_shows_a_float16_cache(tmp_path):
    out = tmp_path / "c"
    runner = CliRunner()
    result = runner.invoke(data_app, ["prepare", "synthetic", "--out", str(out), "--set", "n_records=40",
                                      "--set", "seconds=4", "--set", "cache_dtype=float16", "--workers", "1"])
    assert result.exit_code == 0, result.output
    info = runner.invoke(data_app, ["info", str(out)])
    assert info.exit_code == 0 and "float16 (0.6 MiB)" in info.output  # 40 x 8 x 1000 x 2 bytes
    bad = runner.invoke(data_app, ["prepare", "synthetic", "--out", str(tmp_path / "d"), "--set", "cache_dtype=int8"])
    assert bad.exit_code == 2 and "cache dtype 'int8' is not one of float32, float16" in bad.output


def test_loader_options_from_the_train_section():
    assert loader_options({}) == {"workers": 0, "pin_memory": False}
    assert loader_options({}, "cuda") == {"workers": 0, "pin_memory": True}
    assert loader_options({}, torch.device("cuda", 1))["pin_memory"] is True
    assert loader_options({"loader_workers": 3, "pin_memory": "off"}, "cuda") == {"workers": 3, "pin_memory": False}
    assert loader_options({"pin_memory": "on"}, "cpu")["pin_memory"] is True
    with pytest.raises(ConfigError, match=r"\[train\] loader_workers = -1 is invalid"):
        loader_options({"loader_workers": -1})
    with pytest.raises(ConfigError, match=r"\[train\] pin_memory = True is invalid: it must be one of 'auto'"):
        loader_options({"pin_memory": True})


def test_pretrain_loader_passes_workers_and_pinning(registry):
    loader = pretrain_loader(SYNTHETIC, registry, 8, workers=2, pin_memory=True)
    assert loader.workers == 2 and loader.pin_memory
    reference = pretrain_loader(SYNTHETIC, registry, 8)
    assert [b.record_ids for b in loader] == [b.record_ids for b in reference]
