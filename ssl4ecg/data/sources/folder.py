"""Any folder tree of WFDB records, read without labels (pretraining data).

Every ``.hea`` under ``path`` is one record (its id is the relative path without the
extension). ``# Age:`` and ``# Sex:`` header comments, when present, go to ``extra``.
Records are split by a seeded rule (all ``train`` by default).
"""

from __future__ import annotations

from dataclasses import replace

from ssl4ecg.data.sources.base import (
    RawRecord, RecordEntry, RecordSource, Scan, check_fractions, require_dir, seeded_splits,
)
from ssl4ecg.data.sources.cinc import find_files, header_extra, record_id_of
from ssl4ecg.data.sources.wfdb_io import parse_header, read_record
from ssl4ecg.errors import DataError

URL = "https://physionet.org/about/database/"


class FolderSource(RecordSource):
    """Unlabelled WFDB records from any folder tree (every .hea file is a record)."""

    name = "folder"

    def __init__(
        self,
        path: str = "",
        val_fraction: float = 0.0,
        test_fraction: float = 0.0,
        split_seed: int = 0,
    ) -> None:
        self.path = str(path)
        check_fractions(val_fraction, test_fraction)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.split_seed = int(split_seed)

    def scan(self) -> Scan:
        """Every header under ``path``; corrupt headers are dropped with the reason."""
        root = require_dir(self.path, "WFDB record folder", "WFDB .hea records (any depth)", URL)
        headers = find_files(root, ".hea")
        if not headers:
            raise DataError(f"no WFDB header (.hea) found under {root}: expected WFDB records "
                            f"(e.g. from {URL})")
        entries, dropped = [], []
        for hea in headers:
            rid = record_id_of(hea, root)
            try:
                header = parse_header(hea, root)
            except DataError as exc:
                dropped.append((rid, str(exc)))
                continue
            entries.append(RecordEntry(rid, str(hea.with_suffix("")), rid, "", (),
                                       header_extra(header.comment_fields()),
                                       origin=f"found as {hea.relative_to(root)}"))
        splits = seeded_splits([() for _ in entries], [e.patient_id for e in entries],
                               seed=self.split_seed, val_fraction=self.val_fraction,
                               test_fraction=self.test_fraction)
        entries = [replace(e, split=s) for e, s in zip(entries, splits)]
        return Scan(entries, None, dropped, [], root=str(root))

    def entry_files(self, entry: RecordEntry) -> list[str]:
        """The record's header (it names the signal file, checked when parsed)."""
        return [entry.locator + ".hea"]

    def read(self, entry: RecordEntry) -> RawRecord:
        """The record's signal through the fast WFDB reader (wfdb for unusual formats)."""
        header, signal = read_record(entry.locator, root=self.path)
        if not header.signals:
            raise DataError(f"{entry.locator}.hea describes no signal")
        return RawRecord(signal, header.lead_names, header.fs)
