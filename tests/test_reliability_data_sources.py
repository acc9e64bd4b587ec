"""Datasets that must not be prepared as they are, built from copies of real records.

* a record listed twice (the same PTB-XL ``ecg_id`` in two folds, a CODE-15 exam in two parts or
  on two rows of exams.csv, a folds file naming a record twice) is an error when the listings
  differ, and kept once with a warning when they are identical;
* a patient with records in two splits is an error naming the patient, records and splits;
* record paths read from data files (CSV columns, WFDB headers, symlinks in the tree) must stay
  inside the dataset root;
* a WFDB header listing more signals than it declares, or naming a lead twice, is dropped with
  its own reason.

The checks live in ``RecordSource.scan`` (every source) and the WFDB header parser; their counts
are in ``Scan.integrity`` for the cache manifest.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

from ssl4ecg.data.build import load_records
from ssl4ecg.data.records import RecordSet
from ssl4ecg.data.sources import register_real_sources
from ssl4ecg.data.sources.base import RawRecord, RecordEntry, RecordSource, Scan
from ssl4ecg.data.sources.cinc import CinCSource
from ssl4ecg.data.sources.code15 import Code15Source
from ssl4ecg.data.sources.cpsc2018 import CPSC2018Source
from ssl4ecg.data.sources.folder import FolderSource
from ssl4ecg.data.sources.ptbxl import PTBXLSource
from ssl4ecg.data.sources.wfdb_io import parse_header
from ssl4ecg.errors import DataError
from ssl4ecg.interfaces import STANDARD_LEADS, DataSource
from ssl4ecg.registry import Registry


from test_data_corrupt import copy_ptbxl, registry  # noqa: E402,F401 - shared helpers and fixture


def copy_cinc(shared, dest):
    """The ten CinC-format PTB-XL records (.hea + .mat), writable."""
    shutil.copytree(shared / "cinc-sample" / "ptbxl-hr", dest)
    dest.chmod(0o755)
    for f in dest.iterdir():
        f.chmod(0o644)
    return dest


def _rewrite(path, fn):
    path.write_text(fn(path.read_text()))


# ------------------------------------------------------------------ duplicates and patients

def test_ptbxl_ecg_id_repeated_in_another_fold_is_an_error(shared_data, tmp_path):
    """The reproduced leak: ecg_id 24 (fold 1, train) listed again with strat_fold 10 (test)."""
    root = tmp_path / "ptbxl"
    db = copy_ptbxl(shared_data, root, 6)
    pd.concat([db, db.iloc[[1]].assign(strat_fold=10)]).to_csv(root / "ptbxl_database.csv", index=False)
    with pytest.raises(DataError) as err:
        PTBXLSource(path=str(root)).scan()
    msg = str(err.value)
    assert f"{root / 'ptbxl_database.csv'} lists 1 ecg_id value on several rows" in msg
    assert "ecg_id 24 on lines 3, 8 (strat_fold 1 / 10)" in msg
    assert "Each ecg_id must appear once" in msg


def test_ptbxl_exact_repeated_row_is_kept_once_with_a_warning(shared_data, tmp_path):
    root = tmp_path / "ptbxl"
    db = copy_ptbxl(shared_data, root, 6)
    pd.concat([db, db.iloc[[1]]]).to_csv(root / "ptbxl_database.csv", index=False)
    src = PTBXLSource(path=str(root))
    with pytest.warns(UserWarning, match=r"ptbxl: 1 repeated listing\(s\) of records .* \(records 24\)") as w:
        scan = src.scan()
    assert any(type(x.message).__name__ == "DuplicateRecordsWarning" for x in w)
    ids = [e.record_id for e in scan.entries]
    assert len(ids) == 6 and ids.count("24") == 1
    assert any("1 row of" in n and "repeat an earlier row exactly and was dropped (ecg_id 24; line 8)" in n
               for n in scan.notes)
    assert scan.integrity["duplicates_dropped"] == 1 and scan.integrity["duplicate_ids"] == ["24"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = src.load()
    assert sorted(records.record_ids.astype(int)) == sorted(db.ecg_id)
    assert records.integrity["duplicates_dropped"] == 1


def test_ptbxl_patient_in_two_splits_is_an_error(shared_data, tmp_path):
    """ecg 24 (fold 1, train) and ecg 9 (fold 10, test) given the same patient_id."""
    root = tmp_path / "ptbxl"
    db = copy_ptbxl(shared_data, root, 6)
    db.loc[db.ecg_id == 9, "patient_id"] = 24.0
    db.to_csv(root / "ptbxl_database.csv", index=False)
    with pytest.raises(DataError) as err:
        PTBXLSource(path=str(root)).scan()
    msg = str(err.value)
    assert "ptbxl: 1 patient has records in more than one split" in msg
    assert "patient 24: train (record 24), test (record 9)" in msg
    assert f"The splits come from strat_fold of {root / 'ptbxl_database.csv'}" in msg
    # folds moved together (both test) keep the patient in one split: no error
    db.loc[db.ecg_id == 24, "strat_fold"] = 10
    db.to_csv(root / "ptbxl_database.csv", index=False)
    scan = PTBXLSource(path=str(root)).scan()
    assert scan.integrity["patients_checked"] == 5 and scan.integrity["patients_with_several_records"] == 1


def test_ptbxl_mini_integrity_counts_for_the_manifest(shared_data):
    scan = PTBXLSource(path=str(shared_data / "ptbxl-mini")).scan()
    assert scan.integrity == {
        "records_listed": 1819, "root": str((shared_data / "ptbxl-mini").resolve()),
        "paths_checked": 1819, "duplicates_dropped": 0, "duplicate_ids": [],
        "patients_checked": 1819, "patients_with_several_records": 0,
    }


def test_code15_exam_repeated_in_exams_csv_or_parts_is_an_error(shared_data, tmp_path):
    from test_data_sources import write_code15

    write_code15(tmp_path, shared_data)
    table = pd.read_csv(tmp_path / "exams.csv")
    clean = table.copy()
    pd.concat([table, table.iloc[[1]].assign(patient_id=999)]).to_csv(tmp_path / "exams.csv", index=False)
    with pytest.raises(DataError, match=r"exam_id 1001 on lines 3, 7 \(patient_id 500 / 999\)"):
        Code15Source(path=str(tmp_path)).scan()
    # the same HDF5 part twice: every exam listed from two files
    clean.to_csv(tmp_path / "exams.csv", index=False)
    shutil.copy(tmp_path / "exams_part0.hdf5", tmp_path / "exams_part0_copy.hdf5")
    with pytest.raises(DataError) as err:
        Code15Source(path=str(tmp_path)).scan()
    msg = str(err.value)
    assert "code15: 3 record ids are listed more than once with different contents" in msg
    assert "record 1000 listed 2 times (exams_part0.hdf5 row 0, exams_part0_copy.hdf5 row 0)" in msg


def test_code15_folds_file_that_splits_a_patient_is_an_error(shared_data, tmp_path):
    """Exams 1000 and 1001 belong to patient 500 (write_code15): train and test is a leak."""
    from test_data_sources import write_code15

    write_code15(tmp_path, shared_data)
    folds = tmp_path / "folds.csv"
    folds.write_text("record,split\n1000,train\n1001,test\n1002,train\n1003,train\n1004,val\n")
    with pytest.raises(DataError) as err:
        Code15Source(path=str(tmp_path), folds_file=str(folds)).scan()
    msg = str(err.value)
    assert "patient 500: train (record 1000), test (record 1001)" in msg
    assert f"The splits come from folds file {folds}" in msg


def test_folds_file_naming_a_record_in_two_splits_is_an_error(shared_data, tmp_path):
    root = copy_cinc(shared_data, tmp_path / "cinc")
    folds = tmp_path / "folds.csv"
    folds.write_text("record,split\nHR06000,train\nHR06001,val\nHR06000,test\n")
    with pytest.raises(DataError, match=r"'HR06000' is in split 'train' on line 2 and in 'test' on line 4"):
        CinCSource(path=str(root), folds_file=str(folds)).scan()


class _ListedTwice(RecordSource):
    """A plugin-style source that lists record r1 twice (its own scan, no base-class help)."""

    name = "listed-twice"

    def __init__(self, second_split: str) -> None:
        self.second_split = second_split

    def scan(self) -> Scan:
        entries = [RecordEntry("r1", 0, "p1", "train"), RecordEntry("r2", 1, "p2", "val"),
                   RecordEntry("r1", 0, "p1", self.second_split)]
        return Scan(entries, None)

    def read(self, entry: RecordEntry) -> RawRecord:
        return RawRecord(np.zeros((12, 2500), np.float32), STANDARD_LEADS, 250.0)


def test_every_record_source_gets_the_checks_without_asking():
    with pytest.raises(DataError, match=r"listed-twice: 1 record id is listed more than once .* "
                                        r"record r1 listed 2 times with different split train / test"):
        _ListedTwice("test").scan()
    with pytest.warns(UserWarning, match="repeated listing"):
        scan = _ListedTwice("train").scan()
    assert [e.record_id for e in scan.entries] == ["r1", "r2"]
    assert scan.integrity["duplicates_dropped"] == 1 and scan.integrity["patients_checked"] == 2


class _CrossingPlugin(DataSource):
    """A DataSource whose load() puts patient p1 in train and test."""

    def load(self) -> RecordSet:
        return RecordSet(signals=np.zeros((3, 12, 100), np.float32), leads=STANDARD_LEADS,
                         sampling_rate=100.0, record_ids=np.array(["a", "b", "c"]),
                         patient_ids=np.array(["p1", "p2", "p1"]), splits=np.array(["train", "val", "test"]))


def test_plugin_record_sets_are_checked_on_the_way_in():
    from ssl4ecg.data.cache import as_record_source

    with pytest.raises(DataError, match=r"plugin: 1 patient has records in more than one split.*"
                                        r"patient p1: train \(record a\), test \(record c\)"):
        as_record_source(_CrossingPlugin(), "plugin").scan()
    records = _CrossingPlugin().load()
    with pytest.raises(DataError, match="patient p1: train"):
        records.check_integrity("plugin")
    records.record_ids[2] = "a"
    with pytest.raises(DataError, match=r"1 record ids occur more than once \(a x2\)"):
        records.check_integrity("plugin")


# ------------------------------------------------------------------ paths outside the root

@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_ptbxl_record_paths_outside_the_root_are_refused(shared_data, tmp_path, how):
    root = tmp_path / "ptbxl"
    db = copy_ptbxl(shared_data, root, 4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    name = db.filename_lr[2]  # records100/00000/00043_lr
    for ext in (".hea", ".dat"):
        shutil.copy(root / (name + ext), elsewhere / ("00043_lr" + ext))
    if how == "symlink":  # the header inside the tree is a link to a copy outside it
        (root / (name + ".hea")).unlink()
        (root / (name + ".hea")).symlink_to(elsewhere / "00043_lr.hea")
        listed = name
    else:
        listed = "../elsewhere/00043_lr" if how == "relative" else str(elsewhere / "00043_lr")
        db.loc[2, "filename_lr"] = listed
        db.to_csv(root / "ptbxl_database.csv", index=False)
        for ext in (".hea", ".dat"):
            (root / (name + ext)).unlink()
    with pytest.raises(DataError) as err:
        PTBXLSource(path=str(root)).scan()
    msg = str(err.value)
    assert f"ptbxl: 1 record file outside the dataset root {root.resolve()}" in msg
    assert f"record 43 (ptbxl_database.csv line 4, filename_lr '{listed}')" in msg
    assert f"leads to {elsewhere.resolve() / '00043_lr.hea'}" in msg


def test_wfdb_signal_file_outside_the_root_drops_the_record(shared_data, tmp_path, registry):
    """A header naming '../../../secret.dat': the record is dropped, nothing outside is read."""
    root = tmp_path / "ptbxl"
    db = copy_ptbxl(shared_data, root, 4)
    name = db.filename_lr[1]  # records100/00000/00024_lr
    shutil.move(root / (name + ".dat"), tmp_path / "secret.dat")
    _rewrite(root / (name + ".hea"), lambda t: t.replace("00024_lr.dat", "../../../secret.dat"))
    records = load_records({"source": "ptbxl", "path": str(root)}, registry)
    reasons = dict(records.dropped)
    assert "24" not in records.record_ids and len(records) == 3
    assert (f"signal file '../../../secret.dat' leads to {(tmp_path / 'secret.dat').resolve()}, "
            f"outside the dataset root {root.resolve()}") in reasons["24"]


@pytest.mark.parametrize("source", [CinCSource, FolderSource])
def test_challenge_header_naming_a_file_outside_is_dropped(shared_data, tmp_path, source):
    root = copy_cinc(shared_data, tmp_path / "cinc")
    secret = tmp_path / "secret.mat"
    shutil.move(root / "HR06003.mat", secret)
    _rewrite(root / "HR06003.hea", lambda t: t.replace("HR06003.mat", str(secret)))
    src = source(path=str(root))
    records = src.load()
    assert "HR06003" not in records.record_ids and len(records) == 9
    reason = dict(records.dropped)["HR06003"]
    assert f"signal file '{secret}' leads to {secret.resolve()}, outside the dataset root" in reason


@pytest.mark.parametrize("source", [CinCSource, FolderSource])
def test_symlinked_header_leading_outside_is_refused(shared_data, tmp_path, source):
    root = copy_cinc(shared_data, tmp_path / "cinc")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(root / "HR06002.hea", elsewhere / "HR06002.hea")
    (root / "HR06002.hea").symlink_to(elsewhere / "HR06002.hea")
    with pytest.raises(DataError, match=r"1 \.hea file under .* is a symlink leading outside it "
                                        r"\(.*HR06002\.hea -> .*elsewhere/HR06002\.hea\)"):
        source(path=str(root)).scan()


def test_cpsc2018_mat_symlink_leading_outside_is_refused(shared_data, tmp_path):
    root = tmp_path / "cpsc"
    root.mkdir()
    for f in (shared_data / "cinc-sample" / "cpsc2018-raw").glob("*.mat"):
        shutil.copy(f, root / f.name)
    (tmp_path / "A1985.mat").write_bytes((root / "A1985.mat").read_bytes())
    (root / "A1985.mat").unlink()
    (root / "A1985.mat").symlink_to(tmp_path / "A1985.mat")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no REFERENCE.csv
        with pytest.raises(DataError, match=r"1 \.mat file under .* is a symlink leading outside it"):
            CPSC2018Source(path=str(root)).scan()


def test_code15_part_symlink_leading_outside_is_refused(shared_data, tmp_path):
    from test_data_sources import write_code15

    root = tmp_path / "code15"
    root.mkdir()
    write_code15(root, shared_data)
    shutil.move(root / "exams_part1.hdf5", tmp_path / "exams_part1.hdf5")
    (root / "exams_part1.hdf5").symlink_to(tmp_path / "exams_part1.hdf5")
    with pytest.raises(DataError, match=r"HDF5 part .*exams_part1.hdf5 leads to .*, outside the dataset"):
        Code15Source(path=str(root)).scan()


def test_multi_segment_header_naming_a_segment_outside_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    hea = tmp_path / "data" / "multi.hea"
    hea.write_text("multi/2 12 500 2000\n~ 1000\n../outside_seg 1000\n")
    with pytest.raises(DataError, match=r"segment '\.\./outside_seg' leads to .*outside_seg\.hea, outside"):
        parse_header(hea)


# --------------------------------------------------------------------- inconsistent headers

def test_header_declaring_fewer_signals_than_it_lists_says_so(shared_data, tmp_path, registry):
    root = tmp_path / "ptbxl"
    db = copy_ptbxl(shared_data, root, 4)
    hea = root / (db.filename_lr[1] + ".hea")
    _rewrite(hea, lambda t: t.replace("00024_lr 12 100 1000", "00024_lr 6 100 1000", 1))
    records = load_records({"source": "ptbxl", "path": str(root)}, registry)
    reason = dict(records.dropped)["24"]
    assert reason == f"inconsistent WFDB header {hea}: declares 6 signals, lists 12 signal lines"


@pytest.mark.parametrize("second", ["I", "DI"])
def test_header_naming_a_lead_twice_is_dropped(shared_data, tmp_path, registry, second):
    """Lead II renamed I (or DI, the same lead): the record used the first 'I' and derived II."""
    root = tmp_path / "ptbxl"
    db = copy_ptbxl(shared_data, root, 4)
    hea = root / (db.filename_lr[1] + ".hea")
    _rewrite(hea, lambda t: t.replace(" II\n", f" {second}\n", 1))
    records = load_records({"source": "ptbxl", "path": str(root)}, registry)
    assert "24" not in records.record_ids and len(records) == 3
    reason = dict(records.dropped)["24"]
    assert reason == (f"WFDB header {hea} has duplicate lead names: I (signals 1, 2); which signal "
                      f"is the lead is ambiguous, so the record is not used")


def test_a_prepared_cache_records_the_dropped_duplicate_in_its_manifest(shared_data, tmp_path, registry):
    import json

    from ssl4ecg.data.build import prepare, resolve_data_section
    from ssl4ecg.data.cache import open_cache

    root = tmp_path / "ptbxl"
    db = copy_ptbxl(shared_data, root, 6)
    pd.concat([db, db.iloc[[1]]]).to_csv(root / "ptbxl_database.csv", index=False)
    resolved = resolve_data_section({"source": "ptbxl", "path": str(root), "sampling_rate": 100.0}, registry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(resolved, registry, tmp_path / "cache", workers=1)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["integrity"]["duplicates_dropped"] == 1
    assert manifest["integrity"]["duplicate_ids"] == ["24"]
    assert manifest["integrity"]["patients_checked"] == 6
    records, _ = open_cache(tmp_path / "cache")
    assert records.integrity["duplicates_dropped"] == 1
