"""The original CPSC2018 release (Liu et al. 2018): MATLAB ``.mat`` files + ``REFERENCE.csv``.

Each ``A*.mat`` holds a struct ``ECG`` with fields ``sex``, ``age`` and ``data`` (12 x N,
500 Hz, mV, leads I, II, III, aVR, aVL, aVF, V1-V6). ``REFERENCE.csv`` has the columns
Recording, First_label, Second_label, Third_label with classes 1-9: Normal, AF, I-AVB,
LBBB, RBBB, PAC, PVC, STD, STE. Without ``REFERENCE.csv`` the records are unlabelled (a
warning says so). Get the data at http://2018.icbeb.org/Challenge.html.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from ssl4ecg.data.sources.base import (
    RawRecord, RecordEntry, RecordSource, Scan, check_fractions, parse_age, parse_sex,
    read_split_file, require_dir, seeded_splits,
)
from ssl4ecg.data.sources.cinc import CPSC2018_CLASSES, find_files, record_id_of
from ssl4ecg.errors import DataError
from ssl4ecg.interfaces import STANDARD_LEADS

URL = "http://2018.icbeb.org/Challenge.html"
RATE = 500.0


class CPSC2018Warning(UserWarning):
    """The CPSC2018 folder has no REFERENCE.csv: records are read without labels."""


class CPSC2018Source(RecordSource):
    """CPSC2018 training records from the original .mat files, labels from REFERENCE.csv."""

    name = "cpsc2018"

    def __init__(
        self,
        path: str = "",
        reference: str = "",
        folds_file: str = "",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
    ) -> None:
        self.path = str(path)
        self.reference = str(reference)
        self.folds_file = str(folds_file)
        check_fractions(val_fraction, test_fraction)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.split_seed = int(split_seed)

    def _read_reference(self, path: Path) -> dict[str, tuple[str, ...]]:
        try:
            return self._parse_reference(path)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{path} is not a readable CSV file ({exc})") from None

    def _parse_reference(self, path: Path) -> dict[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {}
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            head = next(reader, [])
            if not head or head[0].strip() != "Recording":
                raise DataError(f"{path} does not start with a 'Recording,First_label,...' header")
            for line, row in enumerate(reader, start=2):
                if not row or not row[0].strip():
                    continue
                names = []
                for cell in row[1:]:
                    cell = cell.strip()
                    if not cell:
                        continue
                    if not (cell.isascii() and cell.isdigit()) or not 1 <= int(cell) <= 9:
                        raise DataError(f"{path} line {line}: label '{cell}' is not a class 1-9")
                    names.append(CPSC2018_CLASSES[int(cell) - 1])
                out[row[0].strip()] = tuple(sorted(set(names)))
        return out

    def scan(self) -> Scan:
        """List the .mat files and join them with REFERENCE.csv (if present)."""
        root = require_dir(self.path, "CPSC2018", "A0001.mat ... and REFERENCE.csv", URL)
        files = find_files(root, ".mat")
        if not files:
            raise DataError(f"no .mat file found under {root}: expected the CPSC2018 training "
                            f"files (A0001.mat ...); get them from {URL}")
        ref_path = Path(self.reference).expanduser() if self.reference else root / "REFERENCE.csv"
        notes: list[str] = []
        reference = None
        if ref_path.is_file():
            reference = self._read_reference(ref_path)
        elif self.reference:
            raise DataError(f"[data] reference {ref_path} not found")
        else:
            message = (f"CPSC2018 at {root} has no REFERENCE.csv: the {len(files)} records are read "
                       f"without labels")
            warnings.warn(message, CPSC2018Warning, stacklevel=2)
            notes.append(message)
        entries, dropped = [], []
        for f in files:
            rid = record_id_of(f, root)
            labels: tuple[str, ...] = ()
            if reference is not None:
                labels = reference.get(f.stem) or reference.get(rid) or ()
                if not labels:
                    dropped.append((rid, f"not listed in {ref_path.name} (no label)"))
                    continue
            entries.append(RecordEntry(rid, str(f), rid, "", labels, {},
                                       origin=f"found as {f.relative_to(root)}"))
        if reference is not None:
            present = {f.stem for f in files}
            missing = sorted(set(reference) - present)
            if missing:
                notes.append(f"{len(missing)} recordings of {ref_path.name} have no .mat file "
                             f"(e.g. {', '.join(missing[:3])})")
        if self.folds_file:
            table = read_split_file(self.folds_file)
            splits = [table.get(e.record_id, "") for e in entries]
        else:
            splits = seeded_splits([e.labels for e in entries], [e.patient_id for e in entries],
                                   seed=self.split_seed, val_fraction=self.val_fraction,
                                   test_fraction=self.test_fraction)

        entries = [replace(e, split=s) for e, s in zip(entries, splits)]
        split_origin = f"folds file {self.folds_file}" if self.folds_file else ""
        return Scan(entries, CPSC2018_CLASSES if reference is not None else None, dropped, notes,
                    root=str(root), split_origin=split_origin)

    def read(self, entry: RecordEntry) -> RawRecord:
        """Load the ``ECG`` struct: ``data`` in mV at 500 Hz, plus age and sex."""
        import scipy.io

        path = entry.locator
        try:
            mat = scipy.io.loadmat(path, variable_names=["ECG"])
        except Exception as exc:  # noqa: BLE001 - scipy raises many types for corrupt files
            raise DataError(f"cannot read {path} as a MATLAB file: {type(exc).__name__}: {exc}") from None
        if "ECG" not in mat:
            raise DataError(f"{path} has no variable 'ECG' (expected the CPSC2018 struct with "
                            f"fields sex, age, data)")
        ecg = mat["ECG"]
        try:
            fields = ecg.dtype.names or ()
            if "data" not in fields:
                raise KeyError
            data = np.asarray(ecg["data"][0, 0])
        except (KeyError, IndexError, TypeError, ValueError):
            raise DataError(f"{path}: struct 'ECG' has no 'data' field") from None
        if data.dtype.kind not in "biuf":  # text, cells, structs or complex numbers
            raise DataError(f"{path}: ECG.data holds {data.dtype} values, expected real numbers")
        data = data.astype(np.float32)
        if data.ndim != 2 or data.shape[0] != 12:
            raise DataError(f"{path}: ECG.data has shape {data.shape}, expected (12, samples)")
        extra = {"age": parse_age(_scalar(ecg, "age")), "sex": parse_sex(_scalar(ecg, "sex"))}
        return RawRecord(data, STANDARD_LEADS, RATE, extra)


def _scalar(struct, name: str):
    """A scalar field of a loadmat struct (``None`` when absent)."""
    try:
        value = struct[name][0, 0]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    value = np.asarray(value).reshape(-1)
    return value[0] if value.size else None
