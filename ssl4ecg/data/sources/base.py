"""The record-level source contract shared by every real dataset reader.

A :class:`RecordSource` works in two steps so that datasets can be read in parallel and
prepared into caches shard by shard:

1. :meth:`RecordSource.scan` lists the dataset cheaply (metadata files, headers): one
   :class:`RecordEntry` per record with its id, patient, split, labels and a picklable
   ``locator``; records that cannot be used at all (no label in the task, a corrupt header)
   are returned as ``dropped`` with a reason.
2. :meth:`RecordSource.read` reads one record's signal (:class:`RawRecord`); it raises
   :class:`ssl4ecg.errors.DataError` for a record that cannot be read, and the caller drops
   that record with the message as reason.
"""

from __future__ import annotations

import abc
import csv
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ssl4ecg.errors import ConfigError, DataError, did_you_mean
from ssl4ecg.interfaces import STANDARD_LEADS, DataSource

#: sex is stored as a number in ``extra["sex"]``: 1.0 female, 0.0 male, NaN unknown
FEMALE, MALE = 1.0, 0.0


@dataclass(frozen=True)
class RecordEntry:
    """One record of a dataset as listed by :meth:`RecordSource.scan` (no signal yet)."""

    record_id: str
    #: what :meth:`RecordSource.read` needs to find the signal (a path, a (file, row) pair...)
    locator: Any
    patient_id: str = ""
    split: str = ""
    #: class names of the record's labels (empty for unlabelled data)
    labels: tuple[str, ...] = ()
    #: per-record metadata: numbers (age, sex) or strings (Dx codes)
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class RawRecord:
    """A record's signal as stored: ``[leads, T]`` at ``sampling_rate`` with lead ``names``."""

    signal: np.ndarray
    leads: tuple[str, ...]
    sampling_rate: float
    #: metadata only found while reading the signal file (e.g. age/sex inside a .mat)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scan:
    """What :meth:`RecordSource.scan` found: usable entries, class names, drops and notes."""

    entries: list[RecordEntry]
    #: class names in label-column order; ``None`` for an unlabelled dataset
    class_names: tuple[str, ...] | None = None
    dropped: list[tuple[str, str]] = field(default_factory=list)
    #: remarks for the user and the cache manifest (fallbacks, unknown codes...)
    notes: list[str] = field(default_factory=list)


class RecordSource(DataSource):
    """A dataset reader that lists records cheaply and reads them one at a time.

    Subclasses implement :meth:`scan` and :meth:`read`; they must stay picklable (they are
    sent to the worker processes of ``ssl4ecg data prepare``).
    """

    #: registry name, used in messages
    name: str = "source"

    def prefer_rate(self, sampling_rate: float) -> None:
        """Hint the rate the data will be resampled to (PTB-XL picks records100/500 by it)."""

    def worker_init(self) -> None:
        """Called once in every worker process before its first read (drop inherited file handles)."""

    @abc.abstractmethod
    def scan(self) -> Scan:
        """List every record (see the module docstring)."""

    @abc.abstractmethod
    def read(self, entry: RecordEntry) -> RawRecord:
        """The signal of one record; :class:`DataError` when it cannot be read."""

    def load(self):
        """All records, raw: ragged ``[12, T_i]`` arrays in STANDARD_LEADS order at the native rate.

        Records at another rate than the first one are resampled to it; records that lack a
        standard lead that cannot be derived are dropped with the reason.
        """
        from ssl4ecg.data.preprocess import resample, select_leads
        from ssl4ecg.data.records import RecordSet

        scan = self.scan()
        signals, kept, dropped = [], [], list(scan.dropped)
        extras: list[dict] = []
        rate = None
        for entry in scan.entries:
            try:
                raw = self.read(entry)
                rate = raw.sampling_rate if rate is None else rate
                sig = select_leads(raw.signal, raw.leads, STANDARD_LEADS, derive=True)
                sig = resample(sig, raw.sampling_rate, rate)
            except DataError as exc:
                dropped.append((entry.record_id, str(exc)))
                continue
            signals.append(sig)
            kept.append(entry)
            extras.append({**entry.extra, **raw.extra})
        if not kept:
            raise DataError(f"{self.name}: no record could be read. {_first_reasons(dropped)}")
        return RecordSet(
            signals=signals,
            leads=STANDARD_LEADS,
            sampling_rate=float(rate),
            record_ids=np.array([e.record_id for e in kept]),
            patient_ids=np.array([e.patient_id or e.record_id for e in kept]),
            splits=np.array([e.split for e in kept]),
            labels=label_matrix([e.labels for e in kept], scan.class_names),
            class_names=tuple(scan.class_names or ()),
            extra=extra_arrays(extras),
            dropped=dropped,
        )


def _first_reasons(dropped: Sequence[tuple[str, str]], n: int = 3) -> str:
    """The first ``n`` drop reasons, for an error message."""
    if not dropped:
        return ""
    shown = "; ".join(f"{rid}: {reason}" for rid, reason in dropped[:n])
    more = f" (and {len(dropped) - n} more)" if len(dropped) > n else ""
    return f"First reasons: {shown}{more}."


def label_matrix(labels: Sequence[Sequence[str]], class_names: Sequence[str] | None) -> np.ndarray | None:
    """Multi-hot ``[N, C]`` float32 from per-record class-name lists (``None`` if unlabelled)."""
    if class_names is None:
        return None
    col = {c: i for i, c in enumerate(class_names)}
    out = np.zeros((len(labels), len(class_names)), dtype=np.float32)
    for i, names in enumerate(labels):
        for name in names:
            out[i, col[name]] = 1.0
    return out


def extra_arrays(extras: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Per-record metadata dicts to one array per key (numbers -> float32 with NaN, else str)."""
    keys = sorted({k for e in extras for k in e})
    out: dict[str, np.ndarray] = {}
    for key in keys:
        values = [e.get(key) for e in extras]
        if all(v is None or isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
               for v in values):
            out[key] = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float32)
        else:
            out[key] = np.array(["" if v is None else str(v) for v in values])
    return out


def require_dir(path: str | Path, what: str, expected: str, url: str) -> Path:
    """``path`` as a directory, or one :class:`DataError` naming what was expected and where to get it."""
    if not str(path):
        raise DataError(
            f"[data] path is empty: set it to the {what} folder ({expected}); get it from {url}")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"{what} not found at {p}: expected a folder with {expected}; get it from {url}")
    return p


def parse_age(text: str | None) -> float:
    """An age string from a header or table (``'59'``, ``'NaN'``, ``'Unknown'``) -> float or NaN."""
    try:
        age = float(str(text).strip())
    except (TypeError, ValueError):
        return math.nan
    return age if 0 <= age < 150 else math.nan


def parse_sex(text: str | None) -> float:
    """``'Female'``/``'F'`` -> 1.0, ``'Male'``/``'M'`` -> 0.0, anything else NaN."""
    s = str(text).strip().lower()
    if s in ("female", "f", "woman", "1"):
        return FEMALE
    if s in ("male", "m", "man", "0"):
        return MALE
    return math.nan


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Reject split fractions outside [0, 1) or summing to 1 or more."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(value) < 1.0:
            raise ConfigError(f"[data] {name} must be in [0, 1), got {value}.")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"[data] val_fraction + test_fraction = {val_fraction + test_fraction} leaves no "
            f"training records; lower them.")


def seeded_splits(
    labels: Sequence[Sequence[str]],
    groups: Sequence[str],
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> list[str]:
    """Assign ``train``/``val``/``test`` by a seeded rule, stratified by label and grouped by patient.

    Every patient (``groups``) goes wholly to one split. Patients are stratified by the
    rarest label among their records (a record's rarest label decides which class it counts
    for, so rare classes get their share in every split); inside each stratum patients are
    shuffled by ``seed`` and the first ``test_fraction`` go to ``test``, the next
    ``val_fraction`` to ``val``, the rest to ``train``. The same inputs always give the same
    splits, independently of the order of records.
    """
    freq: dict[str, int] = {}
    for names in labels:
        for name in names:
            freq[name] = freq.get(name, 0) + 1
    group_labels: dict[str, set[str]] = {}
    for names, group in zip(labels, groups):
        group_labels.setdefault(group, set()).update(names)
    strata: dict[str, list[str]] = {}
    for group, names in group_labels.items():
        key = min(names, key=lambda c: (freq[c], c)) if names else ""
        strata.setdefault(key, []).append(group)
    assignment: dict[str, str] = {}
    for key in sorted(strata):
        members = sorted(strata[key])  # independent of the order records were listed in
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode())])
        order = rng.permutation(len(members))
        n = len(members)
        for rank, idx in enumerate(order):
            position = (rank + 0.5) / n
            split = "test" if position < test_fraction else (
                "val" if position < test_fraction + val_fraction else "train")
            assignment[members[idx]] = split
    return [assignment[g] for g in groups]


def read_split_file(path: str | Path) -> dict[str, str]:
    """A folds file: CSV with a record column (``record``/``record_id``/``Recording``) and ``split``.

    ``split`` holds ``train``, ``val`` or ``test`` per record.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"folds file {p} not found: expected a CSV with columns 'record' and 'split'.")
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            id_col = next((c for c in ("record", "record_id", "Recording") if c in fields), None)
            if id_col is None or "split" not in fields:
                raise DataError(
                    f"folds file {p} has columns {fields}; it needs 'record' (or 'record_id') and 'split'.")
            out: dict[str, str] = {}
            for line, row in enumerate(reader, start=2):
                split = (row["split"] or "").strip()
                if split not in ("train", "val", "test"):
                    raise DataError(
                        f"folds file {p} line {line}: split '{split}' is not train, val or test.")
                out[(row[id_col] or "").strip()] = split
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"folds file {p} is not a readable CSV file ({exc})") from None
    return out


def check_choice(key: str, value: str, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else a :class:`ConfigError` with a suggestion."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"[data] {key} '{value}' is not valid.{did_you_mean(str(value), choices)}")
    return value


class RecordSetSource(RecordSource):
    """Wraps any :class:`DataSource` whose ``load()`` returns a RecordSet (e.g. ``synthetic``).

    Its records go through the same preprocessing and caching path as real datasets; the
    wrapped RecordSet is built once, on the first :meth:`scan`.
    """

    def __init__(self, source: DataSource, name: str = "source") -> None:
        self.source = source
        self.name = name
        self._records = None

    def _loaded(self):
        if self._records is None:
            self._records = self.source.load()
        return self._records

    def scan(self) -> Scan:
        """One entry per record of the loaded RecordSet (locator = row index)."""
        rs = self._loaded()
        extras = [
            {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in rs.extra.items()}
            for i in range(len(rs))
        ]
        class_names = tuple(rs.class_names) if rs.labels is not None and len(rs.class_names) else None
        entries = []
        for i in range(len(rs)):
            labels = () if class_names is None else tuple(
                c for c, on in zip(class_names, np.asarray(rs.labels[i]) > 0.5) if on)
            entries.append(RecordEntry(str(rs.record_ids[i]), i, str(rs.patient_ids[i]),
                                       str(rs.splits[i]), labels, extras[i]))
        return Scan(entries, class_names, list(rs.dropped), [])

    def read(self, entry: RecordEntry) -> RawRecord:
        """Row ``entry.locator`` of the loaded RecordSet."""
        rs = self._loaded()
        return RawRecord(np.asarray(rs.signals[entry.locator]), tuple(rs.leads), float(rs.sampling_rate))
