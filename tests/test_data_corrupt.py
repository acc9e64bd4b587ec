"""Damaged records: copies of real files are corrupted in every way we know, and each bad record
is dropped with its own reason while the rest of the dataset loads."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import scipy.io
from typer.testing import CliRunner

from ssl4ecg.data.build import load_records, prepare, resolve_data_section
from ssl4ecg.data.cache import open_cache
from ssl4ecg.data.cli import data_app
from ssl4ecg.data.sources import register_real_sources
from ssl4ecg.registry import Registry


@pytest.fixture
def registry():
    reg = Registry()
    register_real_sources(reg)
    return reg


def copy_ptbxl(shared, dest, n):
    """The first ``n`` records of ptbxl-mini (database rows, statements, WFDB files) under ``dest``."""
    src = shared / "ptbxl-mini"
    db = pd.read_csv(src / "ptbxl_database.csv").head(n)
    dest.mkdir()
    db.to_csv(dest / "ptbxl_database.csv", index=False)
    shutil.copy(src / "scp_statements.csv", dest)
    for name in db["filename_lr"]:
        for ext in (".hea", ".dat"):
            target = dest / (name + ext)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / (name + ext), target)
    return db


def _rewrite(path, fn):
    path.write_text(fn(path.read_text()))


def test_corrupt_ptbxl_records_dropped_with_reasons(shared_data, tmp_path, registry):
    root = tmp_path / "ptbxl"
    db = copy_ptbxl(shared_data, root, 12)
    rec = {int(r.ecg_id): root / r.filename_lr for r in db.itertuples()}
    ids = list(rec)

    rec[ids[0]].with_suffix(".hea").write_text("garbage\n")  # corrupt header
    dat = rec[ids[1]].with_suffix(".dat")
    dat.write_bytes(dat.read_bytes()[: dat.stat().st_size // 2])  # truncated signal file
    rec[ids[2]].with_suffix(".dat").unlink()  # missing signal file
    dat = rec[ids[3]].with_suffix(".dat")  # invalid samples (WFDB's NaN) in lead I
    samples = np.fromfile(dat, dtype="<i2").reshape(-1, 12)
    samples[100:110, 0] = -32768
    samples.tofile(dat)
    _rewrite(rec[ids[4]].with_suffix(".hea"), lambda t: t.replace(" V1\n", " X1\n"))  # unknown lead
    _rewrite(rec[ids[5]].with_suffix(".hea"),  # a 5 s record
             lambda t: t.replace(" 100 1000", " 100 500", 1))
    hea = rec[ids[6]].with_suffix(".hea")  # header cut after the record line
    hea.write_text(hea.read_text().splitlines()[0] + "\n")

    records = load_records({"source": "ptbxl", "path": str(root)}, registry)
    reasons = dict(records.dropped)
    assert len(records) == 5 and sorted(records.record_ids.astype(int)) == sorted(ids[7:])
    assert "record line 'garbage' needs a name and a signal count" in reasons[str(ids[0])]
    assert "is truncated: it holds 500 samples per signal, the header announces 1000" in reasons[str(ids[1])]
    assert "is missing" in reasons[str(ids[2])]
    assert "10 NaN or infinite samples" in reasons[str(ids[3])]
    assert "lead(s) V1 missing and not derivable; the record has I, II, III, aVR, aVL, aVF, X1" in reasons[str(ids[4])]
    assert "record is 5.00 s long, shorter than the 10.00 s asked" in reasons[str(ids[5])]
    assert "12 signals announced, 0 signal lines found" in reasons[str(ids[6])]

    # the same through a prepared cache: the manifest lists every reason, the rest is cached
    manifest = prepare(resolve_data_section({"source": "ptbxl", "path": str(root)}, registry), registry,
                       tmp_path / "cache", workers=1)
    assert manifest["counts"]["records"] == 5 and manifest["counts"]["dropped"] == 7
    assert dict(map(tuple, manifest["dropped"])) == reasons
    info = CliRunner().invoke(data_app, ["info", str(tmp_path / "cache"), "--dropped", "7"])
    text = " ".join(info.output.split())
    assert info.exit_code == 0 and "dropped 7 records:" in text
    assert "signal file <file> is truncated: it holds N samples per signal, the header announces N x1" in text
    assert f"{ids[3]}: signal holds 10 NaN or infinite samples" in text
    cached, _ = open_cache(tmp_path / "cache")
    np.testing.assert_array_equal(np.asarray(cached.signals), records.signals)
    # padding a 5 s record is an option
    padded = load_records({"source": "ptbxl", "path": str(root), "pad_short": True}, registry)
    assert str(ids[5]) in padded.record_ids and len(padded) == 6


def test_corrupt_challenge_records_dropped_with_reasons(shared_data, tmp_path, registry):
    root = tmp_path / "cinc"
    shutil.copytree(shared_data / "cinc-sample" / "ptbxl-hr", root)
    root.chmod(0o755)
    for f in root.iterdir():
        f.chmod(0o644)
    scipy.io.savemat(root / "HR06000.mat", {"foo": np.zeros((12, 5000), dtype=np.int16)})  # no 'val'
    mat = root / "HR06001.mat"
    mat.write_bytes(mat.read_bytes()[:60000])  # truncated
    _rewrite(root / "HR06002.hea", lambda t: t.replace("# Dx: 426177001,426783006,713426002", "# Dx: 999999999"))
    _rewrite(root / "HR06003.hea", lambda t: t.replace("# Dx: 426783006,427084000", "# Dx: 426783006,123456789,abc"))
    _rewrite(root / "HR06004.hea", lambda t: t.replace("HR06004 12 500 5000", "HR06004 12 fast 5000"))
    (root / "HR06005.mat").unlink()
    raw = bytearray((root / "HR06006.mat").read_bytes())  # invalid samples in lead II
    val = np.frombuffer(raw, dtype="<i2", offset=24).copy().reshape(-1, 12)
    val[2000:2003, 1] = -32768
    raw[24:] = val.tobytes()
    (root / "HR06006.mat").write_bytes(bytes(raw))

    records = load_records({"source": "cinc", "path": str(root), "val_fraction": 0.0,
                            "test_fraction": 0.0}, registry)
    reasons = dict(records.dropped)
    assert sorted(records.record_ids) == ["HR06003", "HR06007", "HR06008", "HR06009"]
    assert "has no variable 'val'" in reasons["HR06000"]
    assert "truncated" in reasons["HR06001"]
    assert "no code of label map 'cpsc2018' (Dx 999999999)" in reasons["HR06002"]
    assert "is not 'name n_sig fs n_samples'" in reasons["HR06004"]
    assert "is missing" in reasons["HR06005"]
    assert "3 NaN or infinite samples" in reasons["HR06006"]
    kept = list(records.record_ids).index("HR06003")
    assert records.extra["dx_unmapped"][kept] == "123456789,abc"  # unknown codes recorded, not fatal
    assert records.labels[kept].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0]
    # the unknown code keeps its record when the map is switched off
    everything = load_records({"source": "cinc", "path": str(root), "label_map": "none"}, registry)
    assert "HR06002" in everything.record_ids and everything.labels is None


def test_corrupt_cpsc2018_files_dropped_with_reasons(shared_data, tmp_path, registry):
    root = tmp_path / "cpsc"
    root.mkdir()
    for f in sorted((shared_data / "cinc-sample" / "cpsc2018-raw").glob("*.mat"))[:6]:
        shutil.copy(f, root / f.name)
        (root / f.name).chmod(0o644)
    scipy.io.savemat(root / "A1980.mat", {"foo": np.ones(3)})  # .mat without its variable
    mat = root / "A1981.mat"
    mat.write_bytes(mat.read_bytes()[:1000])  # truncated
    good = scipy.io.loadmat(root / "A1982.mat")["ECG"]
    data = np.asarray(good["data"][0, 0], dtype=np.float64)
    data[0, 100] = np.nan
    scipy.io.savemat(root / "A1982.mat", {"ECG": {"sex": "Female", "age": 61, "data": data}})
    scipy.io.savemat(root / "A1983.mat", {"ECG": {"sex": "Male", "age": 70, "data": data[:8]}})

    with pytest.warns(UserWarning, match="no REFERENCE.csv"):
        records = load_records({"source": "cpsc2018", "path": str(root), "leads": ["I", "II", "V1"],
                                "val_fraction": 0.0, "test_fraction": 0.0}, registry)
    reasons = dict(records.dropped)
    assert sorted(records.record_ids) == ["A1984", "A1985"]
    assert "has no variable 'ECG'" in reasons["A1980"]
    assert "cannot read" in reasons["A1981"]
    assert "1 NaN or infinite samples" in reasons["A1982"]
    assert "ECG.data has shape (8," in reasons["A1983"]
    # age and sex come from inside the .mat files (read with the signal)
    assert records.extra["age"].tolist() == [23.0, 26.0] and records.extra["sex"].tolist() == [1.0, 1.0]
