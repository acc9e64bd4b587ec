"""benchmarks/scale_data.py at a small size: the generated PTB-XL and CODE-15% layouts are read
by the real sources with the right counts, labels, folds, patients and padding; the memory
sampler sums a process tree."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from ssl4ecg.data.build import prepare, resolve_data_section
from ssl4ecg.data.cache import open_cache
from ssl4ecg.data.sources import register_real_sources
from ssl4ecg.data.sources.code15 import Code15Source
from ssl4ecg.data.sources.wfdb_io import read_record
from ssl4ecg.registry import Registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import scale_data as sd  # noqa: E402

SUPERCLASS = {"NORM": "NORM", "IMI": "MI", "NDT": "STTC", "IVCD": "CD", "LVH": "HYP"}


@pytest.fixture(scope="module")
def registry():
    reg = Registry()
    register_real_sources(reg)
    return reg


@pytest.fixture(scope="module", params=["synthetic", "real"])
def bases(request, tmp_path_factory):
    if request.param == "synthetic":
        return sd.load_bases(tmp_path_factory.mktemp("no-shared-data"), n_synthetic=12)
    from conftest import shared_data_dir

    data = shared_data_dir()
    if data is None:
        pytest.skip("real data not found: the synthetic bases are tested instead")
    return sd.load_bases(data)


def test_ptbxl_layout_reads_back_with_labels_folds_and_both_releases(bases, tmp_path, registry):
    root = tmp_path / "ptbxl"
    info = sd.generate_ptbxl(root, 30, bases, seed=4, workers=2)
    assert info["records"] == 30 and info["patients"] <= 30
    db = pd.read_csv(root / "ptbxl_database.csv")
    assert len(db) == 30 and db["ecg_id"].tolist() == list(range(1, 31))
    assert db.groupby("patient_id")["strat_fold"].nunique().max() == 1  # a patient lies in one fold
    hr, sig_hr = read_record(root / db["filename_hr"][0])
    lr, sig_lr = read_record(root / db["filename_lr"][0])
    assert (hr.fs, sig_hr.shape, lr.fs, sig_lr.shape) == (500.0, (12, 5000), 100.0, (12, 1000))
    assert hr.lead_names == sd.LEADS and 0.05 < float(sig_hr.std()) < 2.0  # millivolts
    # the 100 Hz record is the 500 Hz one decimated (as in the release)
    assert np.corrcoef(sig_hr[:, ::5].ravel(), sig_lr.ravel())[0, 1] > 0.9
    import wfdb  # the reference reader agrees with the direct writer

    ref = wfdb.rdrecord(str(root / db["filename_hr"][0]))
    np.testing.assert_allclose(ref.p_signal.T, sig_hr, atol=1e-6)
    manifests = {}
    for release in ("records500", "records100"):
        section = resolve_data_section({"source": "ptbxl", "path": str(root), "records": release}, registry)
        manifests[release] = prepare(section, registry, tmp_path / release, workers=1)
    for release, manifest in manifests.items():
        assert manifest["counts"]["records"] == 30 and manifest["counts"]["dropped"] == 0
        records, _ = open_cache(tmp_path / release)
        fold = dict(zip(db["ecg_id"].astype(str), db["strat_fold"]))
        expected = {i: ("train" if f <= 8 else "val" if f == 9 else "test") for i, f in fold.items()}
        assert {r: s for r, s in zip(records.record_ids, records.splits)} == expected
        codes = dict(zip(db["ecg_id"].astype(str), db["scp_codes"]))
        for rid, row in zip(records.record_ids, records.labels):
            want = {SUPERCLASS.get(c, c) for c in ast.literal_eval(codes[rid])} & set(records.class_names)
            assert {c for c, on in zip(records.class_names, row) if on} == want
        patients = dict(zip(db["ecg_id"].astype(str), db["patient_id"].astype(int).astype(str)))
        assert all(patients[r] == p for r, p in zip(records.record_ids, records.patient_ids))
    a, _ = open_cache(tmp_path / "records500")
    b, _ = open_cache(tmp_path / "records100")
    assert np.corrcoef(np.asarray(a.signals).ravel(), np.asarray(b.signals).ravel())[0, 1] > 0.9


def test_code15_layout_reads_back_with_labels_padding_and_filler(bases, tmp_path, registry):
    root = tmp_path / "code15"
    info = sd.generate_code15(root, 40, bases, seed=2, workers=2, part_size=16)
    assert info == {**info, "exams": 40, "parts": 3}
    table = pd.read_csv(root / "exams.csv")
    assert len(table) == 40 and table["exam_id"].is_unique
    with h5py.File(root / "exams_part2.hdf5") as h5:
        assert h5["tracings"].shape == (9, 4096, 12) and h5["tracings"].dtype == np.float32
        assert h5["exam_id"][-1] == 0 and not np.any(h5["tracings"][-1])  # the filler row
    source = Code15Source(path=str(root))
    scan = source.scan()
    assert len(scan.entries) == 40 and not scan.dropped
    lengths = {e.record_id: source.read(e).signal.shape[1] for e in scan.entries}
    assert set(lengths.values()) <= {4000, 2800}  # the zero padding is stripped exactly
    row = table.set_index("exam_id")
    for e in scan.entries:
        assert set(e.labels) == {c for c in sd.CODE15_LABELS if row.loc[int(e.record_id), c]}
        assert e.patient_id == str(row.loc[int(e.record_id), "patient_id"])
    section = resolve_data_section({"source": "code15", "path": str(root), "pad_short": True}, registry)
    manifest = prepare(section, registry, tmp_path / "c15", workers=2)
    assert manifest["counts"]["records"] == 40 and manifest["shape"] == [40, 8, 2500]
    short = sum(n == 2800 for n in lengths.values())
    strict = resolve_data_section({"source": "code15", "path": str(root)}, registry)
    assert prepare(strict, registry, tmp_path / "strict", workers=1)["counts"]["dropped"] == short


def test_memory_sampler_sums_a_process_tree():
    child = "x = bytearray(100 * 2**20); import time; time.sleep(1.5)"
    code = ("import subprocess, sys, time\n"
            "x = bytearray(150 * 2**20)\n"
            f"child = subprocess.Popen([sys.executable, '-c', {child!r}])\n"
            "time.sleep(1.5); child.wait()\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    with sd.MemorySampler(proc.pid, interval=0.05) as sampler:
        proc.wait()
    report = sampler.report()
    assert report["peak_processes"] == 2 and report["samples"] > 5
    assert report["peak_RssAnon_MB"] > 250 and report["peak_Pss_Anon_MB"] > 250
    assert report["peak_RssFile_MB"] > 0


@pytest.mark.slow
def test_prepare_measured_runs_the_cli_and_reports(tmp_path):
    bases = sd.load_bases(tmp_path / "none", n_synthetic=8)
    sd.generate_ptbxl(tmp_path / "ptbxl", 24, bases, workers=1)
    start = time.perf_counter()
    result = sd.prepare_measured("ptbxl", tmp_path / "ptbxl", tmp_path / "caches" / "p", ["records=records100",
                                 "cache_dtype=float16"], workers=2)
    assert result["records"] == 24 and result["dtype"] == "float16" and result["peak_processes"] >= 1
    assert 0 < result["prepare_s"] < result["wall_s"] < time.perf_counter() - start + 1
    assert result["signals_bytes"] == 128 + 24 * 8 * 2500 * 2 and result["peak_RssAnon_MB"] > 50
    loaded = sd.loader_measured([tmp_path / "caches" / "p"] * 3, 8, 1, 0.5)
    assert loaded["samples_per_s"] > 0 and loaded["first_batch_s"] < 30 and loaded["dtype"] == "float16"
