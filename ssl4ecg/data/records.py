"""RecordSet: a dataset held as arrays (in memory or memory-mapped), with labels and splits."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from ssl4ecg.errors import DataError
from ssl4ecg.interfaces import Batch, SignalSpec

SPLITS = ("train", "val", "test")


def split_crossings(patient_ids: Sequence[str], splits: Sequence[str],
                    record_ids: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """Patients with records in more than one of train/val/test: patient -> split -> record ids.

    Records without a split (``""``) are not used for training or evaluation and never count.
    """
    seen: dict[str, dict[str, list[str]]] = {}
    for patient, split, rid in zip(patient_ids, splits, record_ids):
        if split in SPLITS and str(patient):
            seen.setdefault(str(patient), {}).setdefault(str(split), []).append(str(rid))
    return {p: by_split for p, by_split in seen.items() if len(by_split) > 1}


def check_patient_splits(patient_ids: Sequence[str], splits: Sequence[str], record_ids: Sequence[str],
                         *, where: str, hint: str = "") -> dict:
    """Raise :class:`DataError` when a patient has records in two splits; else the counts checked.

    The error names up to five patients with their records per split; ``hint`` says where the
    split assignment came from and how to fix it. Returns ``patients_checked`` (patients with
    a split) and ``patients_with_several_records`` for the cache manifest.
    """
    crossing = split_crossings(patient_ids, splits, record_ids)
    if crossing:
        shown = []
        for patient in sorted(crossing)[:5]:
            parts = []
            for split in SPLITS:
                rids = crossing[patient].get(split)
                if rids:
                    more = f" +{len(rids) - 3} more" if len(rids) > 3 else ""
                    plural = "s" if len(rids) > 1 else ""
                    parts.append(f"{split} (record{plural} {', '.join(rids[:3])}{more})")
            shown.append(f"patient {patient}: {', '.join(parts)}")
        more = f"; and {len(crossing) - 5} more patients" if len(crossing) > 5 else ""
        raise DataError(
            f"{where}: {len(crossing)} patient{'s have' if len(crossing) > 1 else ' has'} records in "
            f"more than one split, so the same person would be trained on and evaluated on: "
            f"{'; '.join(shown)}{more}. {hint or 'Assign every patient to one split.'}".rstrip())
    records_of: dict[str, int] = {}
    for patient, split in zip(patient_ids, splits):
        if split in SPLITS and str(patient):
            records_of[str(patient)] = records_of.get(str(patient), 0) + 1
    return {"patients_checked": len(records_of),
            "patients_with_several_records": sum(n > 1 for n in records_of.values())}


@dataclass
class RecordSet:
    """Records of one dataset after (or before) preprocessing.

    ``signals`` is ``[N, leads, T]`` float32 once preprocessed; a raw source may return a
    list of ``[leads, T_i]`` arrays instead (ragged lengths), which preprocessing fixes.
    ``labels`` is ``[N, C]`` multi-hot float32 or ``None``; ``splits`` holds ``"train"``,
    ``"val"``, ``"test"`` or ``""`` (unassigned) per record; ``extra`` holds per-record
    numeric arrays such as ground-truth ``heart_rate`` and ``qrs_ms`` (NaN = unknown).
    """

    signals: np.ndarray | list
    leads: tuple[str, ...]
    sampling_rate: float
    record_ids: np.ndarray
    patient_ids: np.ndarray | None = None
    splits: np.ndarray | None = None
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    #: records a source could not read: list of (record id or file, reason)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    #: results of the listing checks (duplicates dropped, patients checked, paths confined),
    #: for the cache manifest; see :func:`ssl4ecg.data.sources.base.check_scan`
    integrity: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.signals)
        self.record_ids = np.asarray(self.record_ids).astype(str)
        if self.patient_ids is None:
            self.patient_ids = self.record_ids.copy()
        self.patient_ids = np.asarray(self.patient_ids).astype(str)
        if self.splits is None:
            self.splits = np.full(n, "", dtype="<U5")
        self.splits = np.asarray(self.splits).astype("<U5")
        for name, arr in [("record_ids", self.record_ids), ("patient_ids", self.patient_ids),
                          ("splits", self.splits)]:
            if len(arr) != n:
                raise ValueError(f"RecordSet.{name} has {len(arr)} entries for {n} records")
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"RecordSet.labels has {len(self.labels)} rows for {n} records")

    def __len__(self) -> int:
        return len(self.signals)

    def check_integrity(self, where: str = "records") -> dict:
        """Raise :class:`DataError` on repeated record ids or a patient in two splits; else the counts.

        The same checks :func:`ssl4ecg.data.sources.base.check_scan` runs on a source's listing,
        for RecordSets built some other way (a plugin's ``load()``, an opened cache).
        """
        ids, counts = np.unique(self.record_ids, return_counts=True)
        if (counts > 1).any():
            repeated = [f"{rid} x{n}" for rid, n in zip(ids[counts > 1], counts[counts > 1])]
            raise DataError(
                f"{where}: {len(repeated)} record ids occur more than once ({', '.join(repeated[:5])}"
                f"{', ...' if len(repeated) > 5 else ''}); every record must have its own id.")
        return check_patient_splits(self.patient_ids, self.splits, self.record_ids, where=where)

    @property
    def n_samples(self) -> int:
        if isinstance(self.signals, np.ndarray):
            return int(self.signals.shape[-1])
        raise ValueError("ragged RecordSet has no single length; preprocess it first")

    @property
    def spec(self) -> SignalSpec:
        return SignalSpec(tuple(self.leads), float(self.sampling_rate), self.n_samples)

    @property
    def is_labelled(self) -> bool:
        return self.labels is not None and len(self.class_names) > 0

    def subset(self, index: np.ndarray | Sequence[int]) -> "RecordSet":
        """The records at ``index`` (an int array or a bool mask), in that order."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        if isinstance(self.signals, np.ndarray):
            if len(index) and np.all(np.diff(index) == 1):
                signals = self.signals[index[0]:index[-1] + 1]  # a view: memory maps stay mapped
            else:
                signals = self.signals[index]
        else:
            signals = [self.signals[i] for i in index]
        return replace(
            self,
            signals=signals,
            record_ids=self.record_ids[index],
            patient_ids=self.patient_ids[index],
            splits=self.splits[index],
            labels=None if self.labels is None else self.labels[index],
            extra={k: v[index] for k, v in self.extra.items()},
            dropped=list(self.dropped),
            integrity=dict(self.integrity),
        )

    def split(self, *names: str) -> "RecordSet":
        """The records whose split is one of ``names``."""
        return self.subset(np.isin(self.splits, names))

    def to_batch(self, index: np.ndarray | Sequence[int] | None = None) -> Batch:
        """A :class:`Batch` of the records at ``index`` (all records when ``None``)."""
        part = self if index is None else self.subset(index)
        signal = torch.from_numpy(np.ascontiguousarray(part.signals, dtype=np.float32))
        labels = None if part.labels is None else torch.from_numpy(
            np.asarray(part.labels, dtype=np.float32))
        extra = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in part.extra.items()
                 if np.issubdtype(np.asarray(v).dtype, np.number)}
        return Batch(signal=signal, leads=tuple(part.leads), sampling_rate=float(part.sampling_rate),
                     labels=labels, record_ids=list(part.record_ids),
                     patient_ids=list(part.patient_ids), extra=extra)

    def summary(self) -> dict:
        """Counts per split and per class, for logs and `data info`."""
        out: dict = {"records": len(self), "leads": list(self.leads),
                     "sampling_rate": self.sampling_rate}
        out["splits"] = {s: int((self.splits == s).sum()) for s in SPLITS}
        if self.is_labelled:
            out["classes"] = {c: int(self.labels[:, i].sum()) for i, c in enumerate(self.class_names)}
        if self.dropped:
            out["dropped"] = len(self.dropped)
        return out
