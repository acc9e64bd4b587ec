"""Prepared caches: layout and manifest, idempotence, resume after interruption, reading without
touching raw files, conversions, automatic caches and the `ssl4ecg data` commands."""

from __future__ import annotations

import builtins
import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import ssl4ecg.data.cache as cache_mod
from ssl4ecg.data.build import load_records, pretrain_loader, prepare, resolve_data_section
from ssl4ecg.data.cache import open_cache, prepare_cache, read_manifest, verify_cache
from ssl4ecg.data.cli import data_app, parse_set
from ssl4ecg.data.loader import BatchLoader
from ssl4ecg.data.preprocess import Preprocessing
from ssl4ecg.data.sources import register_real_sources
from ssl4ecg.data.sources.base import RawRecord, RecordEntry, RecordSource, Scan
from ssl4ecg.data.sources.ptbxl import PTBXLSource
from ssl4ecg.errors import ConfigError, DataError
from ssl4ecg.registry import Registry


@pytest.fixture
def registry():
    reg = Registry()
    register_real_sources(reg)
    return reg


@pytest.fixture
def ptbxl_copy(shared_data, tmp_path):
    """40 ptbxl-mini records (every split represented) copied to tmp_path."""
    src = shared_data / "ptbxl-mini"
    db = pd.read_csv(src / "ptbxl_database.csv")
    db = pd.concat([db[db.strat_fold <= 8].head(30), db[db.strat_fold == 9].head(5), db[db.strat_fold == 10].head(5)])
    root = tmp_path / "ptbxl"
    root.mkdir()
    db.to_csv(root / "ptbxl_database.csv", index=False)
    shutil.copy(src / "scp_statements.csv", root)
    for name in db["filename_lr"]:
        for ext in (".hea", ".dat"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / (name + ext), root / (name + ext))
    return root


def _section(root, registry, **extra):
    return resolve_data_section({"source": "ptbxl", "path": str(root), **extra}, registry)


def test_cache_layout_manifest_and_checksums(ptbxl_copy, tmp_path, registry):
    out = tmp_path / "cache"
    manifest = prepare(_section(ptbxl_copy, registry), registry, out, workers=2)
    assert sorted(p.name for p in out.iterdir()) == ["labels.npy", "manifest.json", "meta.npz", "signals.npy"]
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["shape"] == [40, 8, 2500] and manifest["source"] == "ptbxl"
    assert manifest["options"]["task"] == "superdiagnostic" and manifest["options"]["path"] == str(ptbxl_copy)
    assert manifest["counts"]["splits"] == {"train": 30, "val": 5, "test": 5, "": 0}
    assert set(manifest["versions"]) >= {"ssl4ecg", "numpy", "scipy", "python"}
    assert len(manifest["dataset_stats"]["mean"]) == 8 and manifest["dataset_stats"]["records"] == 30
    assert verify_cache(out) == []
    records, _ = open_cache(out)
    assert isinstance(records.signals, np.memmap) and not records.signals.flags.writeable
    # split blocks are contiguous: train rows first, then val, then test
    assert records.splits.tolist() == ["train"] * 30 + ["val"] * 5 + ["test"] * 5
    raw = load_records(_section(ptbxl_copy, registry), registry)
    np.testing.assert_array_equal(np.asarray(records.signals), raw.signals)
    assert records.record_ids.tolist() == raw.record_ids.tolist()
    np.testing.assert_array_equal(records.labels, raw.labels)
    # a flipped byte is detected
    with open(out / "meta.npz", "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert verify_cache(out) == ["meta.npz"]


def test_prepare_is_idempotent_and_refuses_other_options(ptbxl_copy, tmp_path, registry, monkeypatch):
    out = tmp_path / "cache"
    first = prepare(_section(ptbxl_copy, registry), registry, out, workers=1)

    def boom(*a, **k):
        raise AssertionError("an up-to-date cache must not be processed again")

    monkeypatch.setattr(cache_mod, "process_entries", boom)
    assert prepare(_section(ptbxl_copy, registry), registry, out, workers=1) == first
    with pytest.raises(ConfigError, match="prepared with other options.*--force"):
        prepare(_section(ptbxl_copy, registry, sampling_rate=100.0), registry, out, workers=1)
    monkeypatch.undo()
    again = prepare(_section(ptbxl_copy, registry, sampling_rate=100.0), registry, out, workers=1, force=True)
    assert again["shape"] == [40, 8, 1000]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="is not empty and is not an ssl4ecg cache"):
        prepare(_section(ptbxl_copy, registry), registry, other, workers=1)


def test_interrupted_prepare_resumes_without_redoing_shards(ptbxl_copy, tmp_path, registry, monkeypatch):
    pp = Preprocessing()
    out = tmp_path / "cache"

    def interrupt(done, total):
        if done >= 16:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_cache(PTBXLSource(path=str(ptbxl_copy)), "ptbxl", {"path": str(ptbxl_copy)}, pp, out,
                      workers=1, shard_size=8, progress=interrupt)
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="not a complete ssl4ecg cache.*run the same command again"):
        open_cache(out)
    assert len(list((out / ".work").glob("shard_*.json"))) == 2

    processed = []
    original = cache_mod.process_entries

    def counting(source, entries, positions, pp):
        processed.extend(positions)
        return original(source, entries, positions, pp)

    monkeypatch.setattr(cache_mod, "process_entries", counting)
    manifest = prepare_cache(PTBXLSource(path=str(ptbxl_copy)), "ptbxl", {"path": str(ptbxl_copy)}, pp, out,
                             workers=1, shard_size=8)
    assert sorted(processed) == list(range(16, 40))  # only the three unfinished shards
    assert manifest["counts"]["records"] == 40 and not (out / ".work").exists()
    clean = tmp_path / "clean"
    prepare_cache(PTBXLSource(path=str(ptbxl_copy)), "ptbxl", {"path": str(ptbxl_copy)}, pp, clean,
                  workers=1, shard_size=8)
    assert (out / "signals.npy").read_bytes() == (clean / "signals.npy").read_bytes()


def test_training_from_a_cache_never_opens_a_wfdb_file(ptbxl_copy, tmp_path, registry, monkeypatch):
    import wfdb

    from ssl4ecg.data.sources import ptbxl as ptbxl_mod
    from ssl4ecg.data.sources import wfdb_io

    out = tmp_path / "cache"
    prepare(_section(ptbxl_copy, registry), registry, out, workers=1)
    opened = []

    def forbid(*args, **kwargs):
        raise AssertionError(f"raw data accessed: {args[:1]}")

    for target, name in [(wfdb, "rdrecord"), (wfdb, "rdheader"), (wfdb_io, "read_record"),
                         (wfdb_io, "parse_header"), (ptbxl_mod, "read_record"),
                         (ptbxl_mod.PTBXLSource, "scan"), (ptbxl_mod.PTBXLSource, "read")]:
        monkeypatch.setattr(target, name, forbid)
    real_open, real_io_open = builtins.open, io.open

    def guarded(opener):
        def inner(file, *args, **kwargs):
            if str(file).endswith((".hea", ".dat", ".mat", ".csv")):
                opened.append(str(file))
                raise AssertionError(f"raw file opened: {file}")
            return opener(file, *args, **kwargs)
        return inner

    monkeypatch.setattr(builtins, "open", guarded(real_open))
    monkeypatch.setattr(io, "open", guarded(real_io_open))
    records = load_records({"cache": str(out)}, registry)
    loader = BatchLoader(records, 8, seed=1, prefetch=2)
    batches = list(loader)
    assert len(batches) == 5 and batches[0].signal.shape == (8, 8, 2500)
    assert batches[0].labels.shape == (8, 5)
    train = pretrain_loader({"cache": str(out)}, registry, 4, seed=0)
    assert len(train) == 35 // 4 and next(iter(train)).signal.shape == (4, 8, 2500)
    assert opened == []


def test_cached_records_converted_in_memory_when_settings_differ(shared_data, tmp_path, registry):
    out = tmp_path / "cinc12"
    root = shared_data / "cinc-sample" / "ptbxl-hr"
    full = {"source": "cinc", "path": str(root), "sampling_rate": 500.0,
            "leads": ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]}
    prepare(resolve_data_section(full, registry), registry, out, workers=1)
    inherited = resolve_data_section({"cache": str(out)}, registry)
    assert inherited["sampling_rate"] == 500.0 and len(inherited["leads"]) == 12
    assert inherited["source"] == "cinc" and inherited["label_map"] == "cpsc2018"
    asked = {"sampling_rate": 250.0, "seconds": 8.0, "leads": ["V1", "II", "aVF"], "normalize": "lead"}
    converted = load_records({"cache": str(out), **asked}, registry)
    direct = load_records({**full, **asked}, registry)
    assert converted.signals.shape == direct.signals.shape == (10, 3, 2000)
    np.testing.assert_allclose(converted.signals, direct.signals, atol=2e-4)
    with pytest.raises(ConfigError, match="holds 10 s records and \\[data\\] seconds asks 12"):
        load_records({"cache": str(out), "seconds": 12.0}, registry)
    with pytest.raises(ConfigError, match="label_map = 'none' differs from cache .* prepared with label_map = 'cpsc2018'"):
        resolve_data_section({"cache": str(out), "label_map": "none"}, registry)
    assert resolve_data_section({"cache": str(out), "label_map": "cpsc2018"}, registry)["label_map"] == "cpsc2018"
    with pytest.raises(ConfigError, match="contradicts cache"):
        resolve_data_section({"cache": str(out), "source": "ptbxl"}, registry)
    with pytest.raises(DataError, match="cache .* not found: create it with `ssl4ecg data prepare"):
        resolve_data_section({"cache": str(tmp_path / "none")}, registry)


def test_cache_dir_prepares_once_then_reads_the_cache(ptbxl_copy, tmp_path, registry, monkeypatch):
    section = {"source": "ptbxl", "path": str(ptbxl_copy), "cache_dir": str(tmp_path / "caches")}
    first = load_records(section, registry)
    made = list((tmp_path / "caches").iterdir())
    assert len(made) == 1 and (made[0] / "manifest.json").exists()
    monkeypatch.setattr(PTBXLSource, "scan", lambda self: (_ for _ in ()).throw(AssertionError("rescanned")))
    second = load_records(section, registry)
    np.testing.assert_array_equal(np.asarray(second.signals), first.signals)


def test_a_cache_reads_without_its_source_installed(ptbxl_copy, tmp_path, registry):
    out = tmp_path / "cache"
    prepare(_section(ptbxl_copy, registry), registry, out, workers=1)
    bare = Registry()  # no source registered at all
    resolved = resolve_data_section({"cache": str(out)}, bare)
    assert resolved["source"] == "ptbxl" and resolved["task"] == "superdiagnostic"
    assert len(load_records(resolved, bare)) == 40
    with pytest.raises(ConfigError, match="unknown key 'tsk'.*Did you mean 'task'"):
        resolve_data_section({"cache": str(out), "tsk": "all"}, bare)


def test_dataset_normalisation_uses_train_statistics(ptbxl_copy, tmp_path, registry):
    out = tmp_path / "cache"
    prepare(_section(ptbxl_copy, registry), registry, out, workers=1)
    normed = load_records({"cache": str(out), "normalize": "dataset"}, registry)
    train = normed.signals[normed.splits == "train"]
    np.testing.assert_allclose(train.mean(axis=(0, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(train.std(axis=(0, 2)), 1, atol=1e-3)
    raw = load_records(_section(ptbxl_copy, registry, normalize="dataset"), registry)
    np.testing.assert_allclose(raw.signals, normed.signals, atol=1e-4)


def test_cli_prepare_info_and_errors(ptbxl_copy, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-cache"
    res = runner.invoke(data_app, ["prepare", "ptbxl", str(ptbxl_copy), "--out", str(out),
                                   "--set", "sampling_rate=100", "--set", "task=superdiagnostic",
                                   "--workers", "1"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "cache ready" in text and "40 records (0 dropped)" in text
    assert read_manifest(out)["shape"] == [40, 8, 1000]
    res = runner.invoke(data_app, ["info", str(out), "--verify"])
    assert res.exit_code == 0, res.output
    for text in ("ptbxl", "40 of 40 listed", "train 30", "val 5", "test 5", "NORM", "ok"):
        assert text in res.output
    res = runner.invoke(data_app, ["prepare", "ptbxl", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "physionet.org/content/ptb-xl" in res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1
    res = runner.invoke(data_app, ["prepare", "ptbxl", str(ptbxl_copy), "--out", str(tmp_path / "y"),
                                   "--set", "sampling_rat=100"])
    assert res.exit_code == 2 and "Did you mean 'sampling_rate'?" in res.output
    res = runner.invoke(data_app, ["info", str(tmp_path)])
    assert res.exit_code == 1 and "manifest.json is missing" in res.output


def test_parse_set_values():
    assert parse_set(["sampling_rate=500", "leads=[\"I\", \"II\"]", "task=rhythm", "single_label=true",
                      "data.bandpass=[0.67, 40]"]) == {
        "sampling_rate": 500, "leads": ["I", "II"], "task": "rhythm", "single_label": True,
        "bandpass": [0.67, 40]}
    with pytest.raises(ConfigError, match="is not key=value"):
        parse_set(["sampling_rate"])


@pytest.mark.slow
def test_ptbxl_mini_full_cache(shared_data, tmp_path, registry):
    out = tmp_path / "ptbxl-mini"
    manifest = prepare(_section(shared_data / "ptbxl-mini", registry), registry, out, workers=2)
    assert manifest["counts"]["records"] == 1819 and manifest["counts"]["dropped"] == 0
    assert manifest["counts"]["classes"] == {"CD": 462, "HYP": 193, "MI": 262, "NORM": 964, "STTC": 527}
    assert manifest["counts"]["splits"] == {"train": 1442, "val": 183, "test": 194, "": 0}
    assert any("records500/ is absent" in n for n in manifest["notes"])
    records = load_records({"cache": str(out)}, registry)
    assert records.spec.n_samples == 2500 and records.summary()["classes"]["NORM"] == 964
    test = records.split("test")
    assert len(test) == 194 and test.labels.sum(axis=0).min() > 0


_HELD: dict[int, int] = {}


class _CountingSource(RecordSource):
    """600 tiny records; each read reports how many RecordEntry objects its process holds."""

    name = "counting"

    def scan(self) -> Scan:
        entries = [RecordEntry(f"r{i}", i, split="train", extra={"note": "x" * 200}) for i in range(600)]
        return Scan(entries, None)

    def read(self, entry: RecordEntry) -> RawRecord:
        import gc
        import os

        if os.getpid() not in _HELD:  # counted at a process's first read (counting is slow)
            _HELD[os.getpid()] = sum(isinstance(o, RecordEntry) for o in gc.get_objects())
        held = _HELD[os.getpid()]
        signal = np.full((2, 400), float(entry.locator), dtype=np.float32)
        return RawRecord(signal, ("I", "II"), 100.0, extra={"entries_held": held})


def test_prepare_workers_do_not_inherit_the_whole_listing(tmp_path):
    """The parent's listing (about 1 KB per record) is out of memory while the workers run, so
    their memory does not grow with the dataset (each holds its shard's entries only)."""
    pp = Preprocessing(sampling_rate=100.0, seconds=4.0, leads=("I", "II"))
    manifest = prepare_cache(_CountingSource(), "counting", {}, pp, tmp_path / "c", workers=2, shard_size=50)
    assert manifest["counts"]["records"] == 600 and manifest["workers"] == 2
    records, _ = open_cache(tmp_path / "c")
    assert records.extra["entries_held"].max() <= 2 * 50
    assert records.extra["note"].tolist() == ["x" * 200] * 600  # the listing's metadata is all there
    np.testing.assert_array_equal(records.signals[:, 0, 0], np.arange(600))
