"""The real-data sources on the shared files: PTB-XL mini, CinC challenge records, raw CPSC2018,
CODE-15 (an HDF5 file written here in the real layout) and plain WFDB folders."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import wfdb

from ssl4ecg.data.sources.base import seeded_splits
from ssl4ecg.data.sources.cinc import CinCSource
from ssl4ecg.data.sources.code15 import CLASSES as CODE15_CLASSES
from ssl4ecg.data.sources.code15 import Code15Source
from ssl4ecg.data.sources.cpsc2018 import CPSC2018Source, CPSC2018Warning
from ssl4ecg.data.sources.folder import FolderSource
from ssl4ecg.data.sources.ptbxl import PTBXLSource
from ssl4ecg.data.sources.wfdb_io import parse_header, read_record
from ssl4ecg.errors import ConfigError, DataError
from ssl4ecg.interfaces import STANDARD_LEADS


# ------------------------------------------------------------------------------------ PTB-XL

def test_ptbxl_mini_superdiagnostic_counts_and_folds(shared_data):
    src = PTBXLSource(path=str(shared_data / "ptbxl-mini"))
    src.prefer_rate(250.0)
    scan = src.scan()
    assert len(scan.entries) == 1819 and scan.dropped == []
    assert scan.class_names == ("CD", "HYP", "MI", "NORM", "STTC")
    counts = {c: sum(c in e.labels for e in scan.entries) for c in scan.class_names}
    assert counts == {"NORM": 964, "STTC": 527, "CD": 462, "MI": 262, "HYP": 193}
    splits = pd.Series([e.split for e in scan.entries]).value_counts().to_dict()
    assert splits == {"train": 1442, "val": 183, "test": 194}
    # records500/ is absent in the mini set: fall back to records100 with a note
    assert any("records500/ is absent" in n for n in scan.notes)
    assert all("/records100/" in e.locator for e in scan.entries)


def test_ptbxl_reads_a_record_equal_to_wfdb(shared_data):
    src = PTBXLSource(path=str(shared_data / "ptbxl-mini"))
    entry = src.scan().entries[0]
    raw = src.read(entry)
    ref = wfdb.rdrecord(entry.locator)
    assert raw.leads == tuple(ref.sig_name) == STANDARD_LEADS and raw.sampling_rate == 100
    np.testing.assert_allclose(raw.signal, ref.p_signal.T, atol=1e-6)


def test_ptbxl_tasks_single_label_and_folds(shared_data):
    root = str(shared_data / "ptbxl-mini")
    every = PTBXLSource(path=root, task="all").scan()
    assert set(every.class_names) == {"NORM", "IMI", "NDT", "IVCD", "LVH"}
    sub = PTBXLSource(path=root, task="subdiagnostic").scan()
    assert set(sub.class_names) == {"NORM", "IMI", "STTC", "IVCD", "LVH"}
    single = PTBXLSource(path=root, single_label=True).scan()
    assert all(len(e.labels) == 1 for e in single.entries)
    assert len(single.entries) + len(single.dropped) == 1819
    assert any("single_label keeps records with exactly one" in r for _, r in single.dropped)
    paper = PTBXLSource(path=root, train_folds=[1, 2, 3, 4, 5, 6, 7, 8, 9], val_folds=[]).scan()
    assert sum(e.split == "train" for e in paper.entries) == 1442 + 183
    with pytest.raises(ConfigError, match="fold 9 is in both train_folds and val_folds"):
        PTBXLSource(path=root, train_folds=[9])
    with pytest.raises(ConfigError, match="Did you mean 'superdiagnostic'"):
        PTBXLSource(path=root, task="superdiagnostc")


def test_ptbxl_rhythm_task_drops_records_without_a_rhythm_statement(shared_data):
    scan = PTBXLSource(path=str(shared_data / "ptbxl-mini"), task="rhythm").scan()
    assert scan.entries == [] and len(scan.dropped) == 1819
    assert scan.dropped[0][1].startswith("no rhythm statement (scp_codes {")


def test_ptbxl_missing_or_wrong_path_names_the_release(tmp_path):
    with pytest.raises(DataError, match=r"PTB-XL not found at .*physionet.org/content/ptb-xl"):
        PTBXLSource(path=str(tmp_path / "nope")).scan()
    with pytest.raises(DataError, match=r"has no ptbxl_database.csv.*physionet.org/content/ptb-xl"):
        PTBXLSource(path=str(tmp_path)).scan()
    with pytest.raises(DataError, match=r"\[data\] path is empty"):
        PTBXLSource().scan()


# ------------------------------------------------------------------------------ CinC format

def test_cinc_records_parse_dx_age_and_sex(shared_data):
    src = CinCSource(path=str(shared_data / "cinc-sample" / "ptbxl-hr"))
    scan = src.scan()
    assert [e.record_id for e in scan.entries] == [f"HR0600{i}" for i in range(10)]
    first = scan.entries[0]
    assert first.extra["age"] == 59 and first.extra["sex"] == 1.0 and first.extra["dx"] == "164934002,426783006"
    assert first.labels == ("NORM",) and first.extra["dx_unmapped"] == "164934002"
    male = scan.entries[2]
    assert male.extra["sex"] == 0.0 and male.extra["age"] == 29
    assert any("Dx codes outside label map 'cpsc2018'" in n for n in scan.notes)
    assert sorted({e.split for e in scan.entries}) == ["test", "train", "val"]
    raw = src.read(first)
    ref = wfdb.rdrecord(first.locator)
    assert raw.sampling_rate == 500 and raw.signal.shape == (12, 5000)
    np.testing.assert_allclose(raw.signal, ref.p_signal.T, atol=1e-6)


def test_cinc_challenge_label_map_merges_equivalent_codes(shared_data):
    scan = CinCSource(path=str(shared_data / "cinc-sample"), label_map="challenge").scan()
    assert len(scan.class_names) == 26 and "RBBB" in scan.class_names
    labels = {e.record_id: e.labels for e in scan.entries}
    assert labels["ptbxl-hr/HR06000"] == ("NSR", "TAb")
    assert labels["ptbxl-hr/HR06002"] == ("IRBBB", "NSR", "SB")
    unlabelled = CinCSource(path=str(shared_data / "cinc-sample" / "ptbxl-hr"), label_map="none").scan()
    assert unlabelled.class_names is None and len(unlabelled.entries) == 10


def test_seeded_splits_are_stratified_grouped_and_order_free():
    labels = [("A",)] * 50 + [("B",)] * 50 + [("A", "C")] * 10
    groups = [f"p{i // 2}" for i in range(110)]  # two records per patient
    splits = seeded_splits(labels, groups, seed=3, val_fraction=0.2, test_fraction=0.2)
    by_patient = {}
    for g, s in zip(groups, splits):
        by_patient.setdefault(g, set()).add(s)
    assert all(len(s) == 1 for s in by_patient.values())
    rare = [s for lab, s in zip(labels, splits) if "C" in lab]
    assert {"train", "val", "test"} <= set(rare)  # the rare class reaches every split
    order = np.random.default_rng(0).permutation(110)
    shuffled = seeded_splits([labels[i] for i in order], [groups[i] for i in order], seed=3,
                             val_fraction=0.2, test_fraction=0.2)
    assert [splits[i] for i in order] == shuffled
    assert seeded_splits(labels, groups, seed=4, val_fraction=0.2, test_fraction=0.2) != splits


# --------------------------------------------------------------------------------- CPSC2018

def test_cpsc2018_raw_files_parse_and_warn_without_reference(shared_data):
    src = CPSC2018Source(path=str(shared_data / "cinc-sample" / "cpsc2018-raw"))
    with pytest.warns(CPSC2018Warning, match="no REFERENCE.csv"):
        scan = src.scan()
    assert scan.class_names is None and len(scan.entries) == 10
    raw = src.read(scan.entries[0])
    assert raw.leads == STANDARD_LEADS and raw.sampling_rate == 500.0
    assert raw.signal.shape[0] == 12 and 5000 <= raw.signal.shape[1] <= 27000
    assert raw.extra == {"age": 52.0, "sex": 0.0}
    lengths = [src.read(e).signal.shape[1] / 500 for e in scan.entries]
    assert min(lengths) >= 10 and max(lengths) <= 60


def test_cpsc2018_with_reference_labels(shared_data, tmp_path):
    for f in (shared_data / "cinc-sample" / "cpsc2018-raw").glob("*.mat"):
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "REFERENCE.csv").write_text(
        "Recording,First_label,Second_label,Third_label\n"
        "A1980,1,,\nA1981,2,6,\nA1982,9,8,7\nA9999,3,,\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan = CPSC2018Source(path=str(tmp_path)).scan()
    labels = {e.record_id: e.labels for e in scan.entries}
    assert labels == {"A1980": ("NORM",), "A1981": ("AF", "PAC"), "A1982": ("PVC", "STD", "STE")}
    assert len(scan.dropped) == 7 and all("not listed in REFERENCE.csv" in r for _, r in scan.dropped)
    assert any("1 recordings of REFERENCE.csv have no .mat file" in n for n in scan.notes)


# ---------------------------------------------------------------------------------- CODE-15

def write_code15(root, shared_data, n_per_part=(3, 2)):
    """A small CODE-15% release in the real layout, filled with real ECGs resampled to 400 Hz."""
    import h5py

    from ssl4ecg.data.preprocess import resample

    sources = sorted((shared_data / "cinc-sample" / "ptbxl-hr").glob("*.hea"))
    rows, k = [], 0
    for part, n in enumerate(n_per_part):
        tracings = np.zeros((n + 1, 4096, 12), dtype=np.float32)  # + the zero filler row
        ids = np.zeros(n + 1, dtype=np.int64)
        for i in range(n):
            _, sig = read_record(sources[k].with_suffix(""))
            x = resample(sig, 500, 400)  # [12, 4000]
            seconds = 7 if k % 2 else 10
            x = x[:, : seconds * 400]
            pad = (4096 - x.shape[1]) // 2
            tracings[i, pad:pad + x.shape[1]] = x.T
            ids[i] = 1000 + k
            rows.append({"exam_id": 1000 + k, "age": 40 + k, "is_male": k % 2 == 0,
                         "nn_predicted_age": 50.0, "1dAVb": k == 1, "RBBB": k == 2, "LBBB": False,
                         "SB": False, "ST": k == 3, "AF": k in (1, 4), "patient_id": 500 + k // 2,
                         "death": False, "timey": 1.0, "normal_ecg": k == 0,
                         "trace_file": f"exams_part{part}.hdf5"})
            k += 1
        with h5py.File(root / f"exams_part{part}.hdf5", "w") as h5:
            h5.create_dataset("tracings", data=tracings)
            h5.create_dataset("exam_id", data=ids)
    pd.DataFrame(rows).to_csv(root / "exams.csv", index=False)
    return rows


def test_code15_hdf5_layout_labels_and_padding(shared_data, tmp_path):
    rows = write_code15(tmp_path, shared_data)
    src = Code15Source(path=str(tmp_path), val_fraction=0.0, test_fraction=0.0)
    scan = src.scan()
    assert scan.class_names == CODE15_CLASSES
    assert [e.record_id for e in scan.entries] == [str(r["exam_id"]) for r in rows]
    by_id = {e.record_id: e for e in scan.entries}
    assert by_id["1001"].labels == ("1dAVb", "AF") and by_id["1002"].labels == ("RBBB",)
    assert by_id["1000"].labels == () and by_id["1000"].extra == {"age": 40.0, "sex": 0.0}
    assert by_id["1001"].extra["sex"] == 1.0 and by_id["1001"].patient_id == "500"
    lengths = {e.record_id: src.read(e).signal.shape for e in scan.entries}
    assert lengths["1000"] == (12, 4000) and lengths["1001"] == (12, 2800)  # padding stripped
    _, original = read_record(shared_data / "cinc-sample" / "ptbxl-hr" / "HR06000")
    from ssl4ecg.data.preprocess import resample

    np.testing.assert_allclose(src.read(by_id["1000"]).signal, resample(original, 500, 400), atol=1e-6)
    # patients go wholly to one split
    splits = seeded_splits([e.labels for e in scan.entries], [e.patient_id for e in scan.entries],
                           seed=0, val_fraction=0.3, test_fraction=0.3)
    per_patient = {}
    for e, s in zip(scan.entries, splits):
        per_patient.setdefault(e.patient_id, set()).add(s)
    assert all(len(v) == 1 for v in per_patient.values())


def test_code15_missing_files_name_the_download(tmp_path):
    with pytest.raises(DataError, match=r"has no exams.csv.*zenodo"):
        Code15Source(path=str(tmp_path)).scan()


# ---------------------------------------------------------------------------- WFDB folders

def test_folder_source_reads_any_wfdb_tree(shared_data):
    src = FolderSource(path=str(shared_data / "cinc-sample"))
    scan = src.scan()
    assert scan.class_names is None and len(scan.entries) == 10
    assert {e.split for e in scan.entries} == {"train"}
    assert scan.entries[0].extra == {"age": 59.0, "sex": 1.0}
    raw = src.read(scan.entries[3])
    assert raw.signal.shape == (12, 5000) and raw.sampling_rate == 500


def test_fast_header_parser_agrees_with_wfdb(shared_data):
    for rec in [shared_data / "ptbxl-mini" / "records100" / "00000" / "00009_lr",
                shared_data / "cinc-sample" / "ptbxl-hr" / "HR06005"]:
        ours = parse_header(rec.with_suffix(".hea"))
        ref = wfdb.rdheader(str(rec))
        assert ours.lead_names == tuple(ref.sig_name) and ours.fs == ref.fs
        assert ours.n_samples == ref.sig_len
        assert [s.gain for s in ours.signals] == list(ref.adc_gain)
        assert [s.baseline for s in ours.signals] == list(ref.baseline)
        assert ours.comments == ref.comments


def test_code15_prepared_in_parallel_workers(shared_data, tmp_path):
    from ssl4ecg.data.cache import open_cache, prepare_cache
    from ssl4ecg.data.preprocess import Preprocessing

    write_code15(tmp_path, shared_data, n_per_part=(4, 3))
    src = Code15Source(path=str(tmp_path), val_fraction=0.0, test_fraction=0.0)
    src.read(src.scan().entries[0])  # an open HDF5 handle in the parent must not reach the workers
    pp = Preprocessing(sampling_rate=250.0, seconds=10.0)
    manifest = prepare_cache(src, "code15", {"path": str(tmp_path)}, pp, tmp_path / "cache", workers=2, shard_size=2)
    assert manifest["workers"] == 2 and manifest["counts"]["records"] == 4
    reasons = dict(map(tuple, manifest["dropped"]))
    assert set(reasons) == {"1001", "1003", "1005"}  # the 7 s exams
    assert all("7.00 s long, shorter than the 10.00 s asked" in r for r in reasons.values())
    records, _ = open_cache(tmp_path / "cache")
    assert records.signals.shape == (4, 8, 2500) and records.class_names == CODE15_CLASSES
    assert records.labels[list(records.record_ids).index("1002")].tolist() == [0, 1, 0, 0, 0, 0]
    padded = prepare_cache(src, "code15", {"path": str(tmp_path)}, Preprocessing(seconds=10.0, pad_short=True),
                           tmp_path / "padded", workers=2, shard_size=2)
    assert padded["counts"]["records"] == 7 and padded["counts"]["dropped"] == 0


def test_ptbxl_picks_the_release_closest_above_the_rate(shared_data, tmp_path):
    root = tmp_path / "ptbxl"
    root.mkdir()
    for name in ("ptbxl_database.csv", "scp_statements.csv"):
        shutil.copy(shared_data / "ptbxl-mini" / name, root)
    (root / "records100").mkdir()
    (root / "records500").mkdir()
    src = PTBXLSource(path=str(root))
    src.prefer_rate(250.0)
    scan = src.scan()
    assert "/records500/" in scan.entries[0].locator and scan.entries[0].locator.endswith("_hr")
    assert not scan.notes
    src.prefer_rate(100.0)
    assert "/records100/" in src.scan().entries[0].locator
    fixed = PTBXLSource(path=str(root), records="records100")
    fixed.prefer_rate(500.0)
    assert "/records100/" in fixed.scan().entries[0].locator
    src.prefer_rate(500.0)
    entry = src.scan().entries[0]
    with pytest.raises(DataError, match=r"cannot read WFDB header .*records500/00000/00009_hr.hea"):
        src.read(entry)


@pytest.mark.parametrize("fmt", ["16", "212", "80", "24", "32", "61", "wfdb-fallback"])
def test_wfdb_formats_read_like_wfdb(shared_data, tmp_path, fmt, monkeypatch):
    """Every format the fast reader handles matches wfdb.rdrecord; so does the wfdb fallback."""
    from ssl4ecg.data.sources import wfdb_io

    _, signal = read_record(shared_data / "cinc-sample" / "ptbxl-hr" / "HR06004")
    x = signal[:, :1500].T.astype(np.float64)
    write_fmt = {"61": "16", "wfdb-fallback": "16"}.get(fmt, fmt)
    gain = [40.0] * 12 if fmt == "80" else None  # 8-bit samples: a coarse gain keeps them in range
    wfdb.wrsamp("rec", fs=500, units=["mV"] * 12, sig_name=list(STANDARD_LEADS), p_signal=x,
                fmt=[write_fmt] * 12, adc_gain=gain, baseline=[0] * 12 if gain else None,
                write_dir=str(tmp_path))
    if fmt == "61":  # the same samples big-endian
        dat = tmp_path / "rec.dat"
        dat.write_bytes(np.fromfile(dat, dtype="<i2").astype(">i2").tobytes())
        hea = tmp_path / "rec.hea"
        hea.write_text(hea.read_text().replace("rec.dat 16 ", "rec.dat 61 "))
    if fmt == "wfdb-fallback":
        monkeypatch.setattr(wfdb_io, "FAST_FORMATS", set())
    header, ours = read_record(tmp_path / "rec")
    ref = wfdb.rdrecord(str(tmp_path / "rec"))
    assert header.lead_names == STANDARD_LEADS and ours.shape == (12, ref.sig_len) == (12, 1500)
    np.testing.assert_allclose(ours, ref.p_signal.T, atol=1e-5)
    if fmt != "80":
        np.testing.assert_allclose(ours, signal[:, :1500], atol=0.01)
