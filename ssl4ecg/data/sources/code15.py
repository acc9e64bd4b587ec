"""CODE-15% (Ribeiro et al. 2020/2021): ``exams.csv`` + ``exams_part*.hdf5``.

Each HDF5 part holds ``tracings`` ``[N, 4096, 12]`` float32 (400 Hz, leads DI, DII, DIII,
AVR, AVL, AVF, V1-V6, signals of 7-10 s zero-padded symmetrically to 4096 samples) and
``exam_id`` ``[N]`` (the last row of each part is an all-zero filler with exam id 0).
``exams.csv`` has exam_id, age, is_male, the six labels 1dAVb, RBBB, LBBB, SB, ST, AF,
patient_id and trace_file. Tracings are read lazily through h5py, the zero padding is
stripped, and patients go wholly to one split (seeded rule). Get the data at
https://zenodo.org/records/4916206.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from ssl4ecg.data.sources.base import (
    RawRecord, RecordEntry, RecordSource, Scan, check_fractions, drop_duplicate_rows, outside_root,
    read_split_file, real_root, require_dir, seeded_splits,
)
from ssl4ecg.errors import DataError
from ssl4ecg.interfaces import STANDARD_LEADS

URL = "https://zenodo.org/records/4916206"
RATE = 400.0
#: label columns of exams.csv, in the order of the CODE papers
CLASSES = ("1dAVb", "RBBB", "LBBB", "SB", "AF", "ST")


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    try:
        return bool(value) and not math.isnan(float(value))
    except (TypeError, ValueError):
        return False


class Code15Source(RecordSource):
    """CODE-15% exams from the HDF5 parts, six rhythm/conduction labels, zero padding stripped."""

    name = "code15"

    def __init__(
        self,
        path: str = "",
        labelled: bool = True,
        folds_file: str = "",
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 0,
    ) -> None:
        self.path = str(path)
        self.labelled = bool(labelled)
        self.folds_file = str(folds_file)
        check_fractions(val_fraction, test_fraction)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.split_seed = int(split_seed)
        self._files: dict[str, object] = {}

    def worker_init(self) -> None:
        """Forget HDF5 handles inherited from the parent process (h5py handles do not survive fork)."""
        self._files = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}  # open h5py handles never travel to worker processes
        return state

    def scan(self) -> Scan:
        """Join the exam ids of every HDF5 part with exams.csv."""
        import h5py
        import pandas as pd

        root = require_dir(self.path, "CODE-15%", "exams.csv and exams_part*.hdf5", URL)
        csv_path = root / "exams.csv"
        if not csv_path.is_file():
            raise DataError(f"CODE-15% at {root} has no exams.csv; get it from {URL}")
        parts = sorted(root.glob("*.hdf5")) + sorted(root.glob("*.h5"))
        if not parts:
            raise DataError(f"CODE-15% at {root} has no exams_part*.hdf5 file; get them from {URL}")
        outside = {p: real for p, real in outside_root(map(str, parts), real_root(root)).items() if real}
        if outside:
            raise DataError(f"CODE-15% at {root}: HDF5 part{'s' if len(outside) > 1 else ''} "
                            + "; ".join(f"{p} leads to {real}" for p, real in list(outside.items())[:3])
                            + f", outside the dataset root; copy the parts into {root}.")
        table = pd.read_csv(csv_path)
        needed = {"exam_id", *(CLASSES if self.labelled else ())}
        if not needed <= set(table.columns):
            raise DataError(f"{csv_path} lacks columns {sorted(needed - set(table.columns))}")
        table, integrity, notes = drop_duplicate_rows(table, "exam_id", csv_path, "code15")
        table = table.set_index("exam_id")
        dropped: list[tuple[str, str]] = []
        located = []  # (part path, row, exam id)
        for part in parts:
            try:
                with h5py.File(part, "r") as h5:
                    if "tracings" not in h5 or "exam_id" not in h5:
                        raise DataError(f"{part} lacks the 'tracings' or 'exam_id' dataset")
                    shape = h5["tracings"].shape
                    ids = np.asarray(h5["exam_id"][:]).astype(np.int64)
            except OSError as exc:
                dropped.append((part.name, f"cannot open HDF5 file {part}: {exc}"))
                continue
            except DataError as exc:
                dropped.append((part.name, str(exc)))
                continue
            if len(shape) != 3 or shape[2] != 12 or shape[0] != len(ids):
                dropped.append((part.name, f"'tracings' has shape {shape} for {len(ids)} exam ids; "
                                           f"expected [N, samples, 12]"))
                continue
            located.extend((str(part), row, int(exam)) for row, exam in enumerate(ids) if exam != 0)
        exams = np.array([x[2] for x in located], dtype=np.int64)
        info = table.reindex(exams)
        known = np.isin(exams, table.index.to_numpy())
        label_cols = {c: info[c].map(_truthy).to_numpy() for c in CLASSES} if self.labelled else {}
        patients = info["patient_id"].to_numpy() if "patient_id" in info else np.full(len(exams), np.nan)
        ages = info["age"].to_numpy(dtype=float) if "age" in info else None
        males = info["is_male"].to_numpy() if "is_male" in info else None
        entries = []
        for i, (part, row, exam) in enumerate(located):
            rid = str(exam)
            if not known[i]:
                dropped.append((rid, f"exam {rid} of {Path(part).name} is not in exams.csv"))
                continue
            labels = tuple(c for c in CLASSES if label_cols[c][i]) if self.labelled else ()
            patient = rid if _nan(patients[i]) else str(int(patients[i]))
            extra = {}
            if ages is not None:
                extra["age"] = float(ages[i])
            if males is not None:
                extra["sex"] = math.nan if _nan(males[i]) else (0.0 if _truthy(males[i]) else 1.0)
            entries.append(RecordEntry(rid, (part, row), patient, "", labels, extra,
                                       origin=f"{Path(part).name} row {row}"))
        if not entries:
            raise DataError(f"CODE-15% at {root}: no exam could be listed. "
                            + "; ".join(r for _, r in dropped[:3]))
        if self.folds_file:
            table_splits = read_split_file(self.folds_file)
            splits = [table_splits.get(e.record_id, "") for e in entries]
        else:
            splits = seeded_splits([e.labels for e in entries], [e.patient_id for e in entries],
                                   seed=self.split_seed, val_fraction=self.val_fraction,
                                   test_fraction=self.test_fraction)

        entries = [replace(e, split=s) for e, s in zip(entries, splits)]
        split_origin = (f"folds file {self.folds_file} (patients from patient_id of {csv_path})"
                        if self.folds_file else "")
        return Scan(entries, CLASSES if self.labelled else None, dropped, notes, root=str(root),
                    split_origin=split_origin, integrity=integrity)

    def _file(self, name: str):
        import h5py

        handle = self._files.get(name)
        if handle is None:
            try:
                handle = h5py.File(name, "r")
            except OSError as exc:
                raise DataError(f"cannot open HDF5 file {name}: {exc}") from None
            self._files[name] = handle
        return handle

    def read(self, entry: RecordEntry) -> RawRecord:
        """One tracing, transposed to ``[12, T]`` with the zero padding removed."""
        name, row = entry.locator
        try:
            tracing = np.asarray(self._file(name)["tracings"][row], dtype=np.float32)
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"cannot read exam {entry.record_id} (row {row} of {name}): {exc}") from None
        signal = strip_zero_padding(tracing.T)
        if signal.shape[1] == 0:
            raise DataError(f"exam {entry.record_id} (row {row} of {Path(name).name}) is all zeros")
        return RawRecord(signal, STANDARD_LEADS, RATE)


def strip_zero_padding(signal: np.ndarray) -> np.ndarray:
    """Drop the leading and trailing samples where every lead is exactly zero."""
    active = np.flatnonzero(np.any(signal != 0, axis=0))
    if active.size == 0:
        return signal[:, :0]
    return signal[:, active[0]:active[-1] + 1]


def _nan(value) -> bool:
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False
