"""PTB-XL (Wagner et al. 2020) in its PhysioNet release layout, with the benchmark label tasks.

Labels follow the PTB-XL benchmark (Strodthoff et al. 2021): each record's ``scp_codes``
statements with likelihood >= ``min_likelihood`` are aggregated through
``scp_statements.csv``:

* ``all``: every statement; ``diagnostic`` / ``form`` / ``rhythm``: the statements flagged
  so in the table;
* ``subdiagnostic`` / ``superdiagnostic``: the ``diagnostic_subclass`` / ``diagnostic_class``
  of the diagnostic statements (NORM, MI, STTC, CD, HYP for the superclasses).

Classes are the labels that occur in the kept records, sorted by name. Records without any
label in the task are dropped with a reason; ``single_label`` keeps only records with exactly
one label (multi-class). Splits come from ``strat_fold`` (default 1-8 train, 9 val, 10 test).

``ptbxl_database.csv`` is checked: a row repeated exactly is dropped with a note, an
``ecg_id`` on two rows that differ (another ``strat_fold``, other codes) is an error, the
``filename_lr``/``filename_hr`` paths must stay inside ``path``, and no patient may have
records in two splits (the official folds keep patients apart).
"""

from __future__ import annotations

import ast
import math
import os
from pathlib import Path

from ssl4ecg.data.sources.base import (
    RawRecord, RecordEntry, RecordSource, Scan, check_choice, drop_duplicate_rows, parse_age,
    require_dir,
)
from ssl4ecg.data.sources.wfdb_io import read_record
from ssl4ecg.errors import ConfigError, DataError

URL = "https://physionet.org/content/ptb-xl/"
TASKS = ("all", "diagnostic", "subdiagnostic", "superdiagnostic", "form", "rhythm")
RECORD_SETS = ("auto", "records100", "records500")
#: (rate, folder, database column) of the two releases of every record
_RELEASES = ((100.0, "records100", "filename_lr"), (500.0, "records500", "filename_hr"))


class PTBXLSource(RecordSource):
    """PTB-XL 12-lead ECGs with benchmark label aggregation and strat_fold splits.

    ``records`` chooses the 100 Hz or 500 Hz files; ``auto`` takes the lowest rate at or
    above the ``[data] sampling_rate``, falling back (with a note) to the other set if it is
    absent.
    """

    name = "ptbxl"

    def __init__(
        self,
        path: str = "",
        task: str = "superdiagnostic",
        single_label: bool = False,
        train_folds: list = (1, 2, 3, 4, 5, 6, 7, 8),
        val_folds: list = (9,),
        test_folds: list = (10,),
        min_likelihood: float = 0.0,
        records: str = "auto",
    ) -> None:
        self.path = str(path)
        self.task = check_choice("task", task, TASKS)
        self.single_label = bool(single_label)
        self.records = check_choice("records", records, RECORD_SETS)
        self.min_likelihood = float(min_likelihood)
        self.folds: dict[int, str] = {}
        for split, folds in (("train", train_folds), ("val", val_folds), ("test", test_folds)):
            for fold in folds:
                if not isinstance(fold, int) or isinstance(fold, bool):
                    raise ConfigError(f"[data] {split}_folds must list fold numbers, got {fold!r}.")
                if fold in self.folds:
                    raise ConfigError(
                        f"[data] fold {fold} is in both {self.folds[fold]}_folds and {split}_folds.")
                self.folds[fold] = split
        self._rate = 100.0

    def prefer_rate(self, sampling_rate: float) -> None:
        """Remember the target rate to choose records100 or records500."""
        self._rate = float(sampling_rate)

    def _choose_release(self, root: Path, notes: list[str]) -> tuple[str, str, float]:
        if self.records != "auto":
            rate, folder, column = next(r for r in _RELEASES if r[1] == self.records)
            if not (root / folder).is_dir():
                raise DataError(f"PTB-XL at {root} has no {folder}/ folder (asked by [data] records); "
                                f"get the full release from {URL}")
            return folder, column, rate
        wanted = next((r for r in _RELEASES if r[0] >= self._rate), _RELEASES[-1])
        if (root / wanted[1]).is_dir():
            return wanted[1], wanted[2], wanted[0]
        other = next(r for r in _RELEASES if r is not wanted)
        if (root / other[1]).is_dir():
            notes.append(f"PTB-XL: {wanted[1]}/ is absent at {root}; using {other[1]}/ "
                         f"({other[0]:g} Hz) for the requested {self._rate:g} Hz")
            return other[1], other[2], other[0]
        raise DataError(f"PTB-XL at {root} has neither records100/ nor records500/; get the "
                        f"release from {URL}")

    def _statements(self, root: Path) -> dict:
        """scp_statements.csv as plain lookups: known codes, flagged sets, (sub)classes."""
        import pandas as pd

        table = pd.read_csv(root / "scp_statements.csv", index_col=0)
        needed = {"diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass"}
        if not needed <= set(table.columns):
            raise DataError(f"{root / 'scp_statements.csv'} lacks columns "
                            f"{sorted(needed - set(table.columns))}; is it the PTB-XL statement table?")
        flagged = {col: {str(c) for c in table.index[table[col] == 1.0]} for col in ("diagnostic", "form", "rhythm")}
        classes = {col: {str(c): v for c, v in table[col].items() if isinstance(v, str)}
                   for col in ("diagnostic_class", "diagnostic_subclass")}
        return {"known": {str(c) for c in table.index}, **flagged, **classes}

    def _aggregate(self, codes: dict, st: dict) -> list[str]:
        """The record's labels in the task (benchmark aggregation, see the module docstring)."""
        keep = [c for c, lik in codes.items() if c in st["known"] and float(lik) >= self.min_likelihood]
        if self.task == "all":
            return sorted(set(keep))
        if self.task in ("form", "rhythm"):
            return sorted({c for c in keep if c in st[self.task]})
        diagnostic = [c for c in keep if c in st["diagnostic"]]
        if self.task == "diagnostic":
            return sorted(set(diagnostic))
        column = "diagnostic_subclass" if self.task == "subdiagnostic" else "diagnostic_class"
        return sorted({st[column][c] for c in diagnostic if c in st[column]})

    def scan(self) -> Scan:
        """Read ptbxl_database.csv and scp_statements.csv, aggregate labels, assign folds."""
        import pandas as pd

        root = require_dir(self.path, "PTB-XL", "ptbxl_database.csv, scp_statements.csv and records100/", URL)
        for name in ("ptbxl_database.csv", "scp_statements.csv"):
            if not (root / name).is_file():
                raise DataError(f"PTB-XL at {root} has no {name}: expected the PhysioNet release "
                                f"layout; get it from {URL}")
        notes: list[str] = []
        folder, column, rate = self._choose_release(root, notes)
        table = self._statements(root)
        csv_path = root / "ptbxl_database.csv"
        db = pd.read_csv(csv_path)
        needed = {"ecg_id", "scp_codes", "strat_fold", column}
        if not needed <= set(db.columns):
            raise DataError(f"{csv_path} lacks columns {sorted(needed - set(db.columns))}")
        db, integrity, repeat_notes = drop_duplicate_rows(db, "ecg_id", csv_path, "ptbxl")
        notes.extend(repeat_notes)
        entries: list[RecordEntry] = []
        dropped: list[tuple[str, str]] = []
        for row in db.itertuples(index=True):
            rid = str(int(row.ecg_id))
            try:
                codes = ast.literal_eval(row.scp_codes) if isinstance(row.scp_codes, str) else {}
                if not isinstance(codes, dict):
                    raise ValueError
            except (ValueError, SyntaxError):
                dropped.append((rid, f"scp_codes {row.scp_codes!r} is not a dictionary"))
                continue
            labels = self._aggregate(codes, table)
            if not labels:
                dropped.append((rid, f"no {self.task} statement (scp_codes {codes})"))
                continue
            if self.single_label and len(labels) != 1:
                dropped.append((rid, f"{len(labels)} {self.task} labels ({', '.join(labels)}); "
                                     f"single_label keeps records with exactly one"))
                continue
            fold = int(row.strat_fold) if not _isnan(row.strat_fold) else -1
            patient = getattr(row, "patient_id", None)
            patient = rid if patient is None or _isnan(patient) else str(int(float(patient)))
            extra = {}
            if hasattr(row, "age"):
                extra["age"] = parse_age(row.age)
            if hasattr(row, "sex"):  # PTB-XL: 0 male, 1 female (the framework's convention)
                extra["sex"] = float(row.sex) if not _isnan(row.sex) else math.nan
            filename = str(getattr(row, column))
            entries.append(RecordEntry(
                record_id=rid,
                locator=os.path.join(root, filename),
                patient_id=patient,
                split=self.folds.get(fold, ""),
                labels=tuple(labels),
                extra=extra,
                origin=f"{csv_path.name} line {row.Index + 2}, {column} {filename!r}",
            ))
        class_names = tuple(sorted({c for e in entries for c in e.labels}))
        if not self.folds.keys() & set(int(f) for f in db["strat_fold"].dropna()):
            notes.append("PTB-XL: none of the configured folds occurs in strat_fold")
        split_origin = (f"strat_fold of {csv_path}; the official PTB-XL folds keep every patient in "
                        f"one fold, so the file was modified or is corrupt: restore it from {URL}")
        return Scan(entries, class_names, dropped, notes, root=str(root), split_origin=split_origin,
                    integrity=integrity)

    def entry_files(self, entry: RecordEntry) -> list[str]:
        """The record's header (it names the signal file, checked when read)."""
        return [entry.locator + ".hea"]

    def read(self, entry: RecordEntry) -> RawRecord:
        """The record's WFDB file from the chosen release folder."""
        header, signal = read_record(entry.locator, root=self.path)
        return RawRecord(signal, header.lead_names, header.fs)


def _isnan(value) -> bool:
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False
