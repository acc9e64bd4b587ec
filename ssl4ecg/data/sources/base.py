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

Every subclass's ``scan`` is wrapped so that its listing goes through :func:`check_scan`
before anyone sees it: record files must lie inside the dataset root (symlinks resolved),
a record id listed twice is dropped when the listings are identical and an error when they
differ, and no patient may have records in two splits. What the checks found is in
``Scan.integrity`` (for the cache manifest).
"""

from __future__ import annotations

import abc
import csv
import functools
import math
import os
import warnings
import zlib
from dataclasses import dataclass, field, replace
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
    #: where the record was listed, for messages (``ptbxl_database.csv line 18``); never compared
    origin: str = field(default="", compare=False)


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
    #: the dataset folder every record file must lie in, symlinks resolved ("" = no files)
    root: str = ""
    #: where the splits came from, named when a patient is found in two splits
    split_origin: str = ""
    #: what :func:`check_scan` (and a source's table checks) found: counts for the cache manifest
    integrity: dict = field(default_factory=dict)


class DuplicateRecordsWarning(UserWarning):
    """A dataset lists a record more than once with identical contents; the repeats were dropped."""


class RecordSource(DataSource):
    """A dataset reader that lists records cheaply and reads them one at a time.

    Subclasses implement :meth:`scan` and :meth:`read`; they must stay picklable (they are
    sent to the worker processes of ``ssl4ecg data prepare``). A subclass's :meth:`scan` is
    wrapped at class creation so that its result always passes :func:`check_scan`.
    """

    #: registry name, used in messages
    name: str = "source"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        scan = cls.__dict__.get("scan")
        if scan is not None and not getattr(scan, "__isabstractmethod__", False):
            cls.scan = _checked_scan(scan)

    def entry_files(self, entry: RecordEntry) -> list[str]:
        """The files of ``entry`` that must lie inside ``Scan.root`` (default: paths in the locator)."""
        items = entry.locator if isinstance(entry.locator, tuple) else (entry.locator,)
        return [os.fspath(x) for x in items if isinstance(x, (str, os.PathLike))]

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
            integrity=dict(scan.integrity),
        )


def _checked_scan(scan):
    """``scan`` followed by :func:`check_scan` (once, on the outermost call of a super() chain)."""

    @functools.wraps(scan)
    def checked(self) -> Scan:
        depth = self.__dict__.get("_scan_depth", 0)
        self.__dict__["_scan_depth"] = depth + 1
        try:
            result = scan(self)
        finally:
            if depth:
                self.__dict__["_scan_depth"] = depth
            else:
                del self.__dict__["_scan_depth"]
        return result if depth else check_scan(result, self)

    return checked


def real_root(root: str | os.PathLike) -> Path:
    """``root`` with ``~`` expanded and every symlink resolved."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(root))))


def outside_root(files: Iterable[str], root: Path) -> dict[str, str | None]:
    """For each path, where it leads (symlinks resolved) when that is outside ``root``, else ``None``.

    ``root`` is a :func:`real_root`. Each folder is resolved once per call, so checking a
    dataset's files costs about one ``lstat`` per file.
    """
    folders: dict[str, str] = {}
    inside = str(root).rstrip(os.sep) + os.sep
    out: dict[str, str | None] = {}
    for f in files:
        folder, base = os.path.split(os.fspath(f))
        if base in ("", ".", ".."):
            real = os.path.realpath(f)
        else:
            if folder not in folders:
                folders[folder] = os.path.realpath(folder or ".")
            real = os.path.join(folders[folder], base)
            if os.path.islink(real):
                real = os.path.realpath(real)
        out[f] = None if real == str(root) or real.startswith(inside) else real
    return out


def check_scan(scan: Scan, source: RecordSource | None = None) -> Scan:
    """The listing checks every source gets; returns ``scan`` with repeats dropped and ``integrity`` set.

    1. Record files (:meth:`RecordSource.entry_files`) must lie inside ``scan.root`` once
       symlinks are resolved: one :class:`DataError` names the record, the path, where it was
       listed and where it leads.
    2. A record id listed several times: identical listings are kept once (with a note and a
       :class:`DuplicateRecordsWarning`); listings that differ in split, patient, labels, file
       or metadata are a :class:`DataError` naming the ids, what differs and where they were listed.
    3. No patient may have records in two of train/val/test (a :class:`DataError` naming
       example patients, their records and splits, and ``scan.split_origin``).
    """
    from ssl4ecg.data.records import check_patient_splits

    name = getattr(source, "name", "source")
    integrity = dict(scan.integrity)
    integrity["records_listed"] = len(scan.entries)
    if scan.root:
        root = real_root(scan.root)
        integrity["root"] = str(root)
        integrity["paths_checked"] = _check_paths(scan.entries, source, name, root)
    entries, repeats = _drop_repeated_entries(scan.entries, name)
    notes = list(scan.notes)
    dropped_ids = list(integrity.get("duplicate_ids", []))
    if repeats:
        ids = sorted({rid for rid, _ in repeats})
        dropped_ids += ids
        notes.append(f"{name}: {len(repeats)} repeated listing{'s' if len(repeats) > 1 else ''} of "
                     f"{len(ids)} record{'s' if len(ids) > 1 else ''}, identical to the first, dropped "
                     f"(e.g. {', '.join(f'{rid} ({where})' for rid, where in repeats[:3])})")
    integrity["duplicates_dropped"] = integrity.get("duplicates_dropped", 0) + len(repeats)
    integrity["duplicate_ids"] = sorted(set(dropped_ids))[:100]
    if integrity["duplicates_dropped"]:
        warnings.warn(f"{name}: {integrity['duplicates_dropped']} repeated listing(s) of records "
                      f"identical to their first listing were dropped (records "
                      f"{', '.join(integrity['duplicate_ids'][:5])}); each record is used once",
                      DuplicateRecordsWarning, stacklevel=3)
    hint = f"The splits come from {scan.split_origin}." if scan.split_origin else ""
    integrity.update(check_patient_splits(
        [e.patient_id or e.record_id for e in entries], [e.split for e in entries],
        [e.record_id for e in entries], where=name, hint=hint))
    return replace(scan, entries=entries, notes=notes, integrity=integrity)


def _check_paths(entries: Sequence[RecordEntry], source, name: str, root: Path) -> int:
    """Number of distinct record files checked; :class:`DataError` when one lies outside ``root``."""
    files_of = source.entry_files if source is not None else (lambda e: RecordSource.entry_files(None, e))
    files = [(e, f) for e in entries for f in files_of(e)]
    checked = outside_root({f for _, f in files}, root)
    bad = [(e, f, checked[f]) for e, f in files if checked[f] is not None]
    if bad:
        shown = "; ".join(f"record {e.record_id}{f' ({e.origin})' if e.origin else ''}: {f} leads to {real}"
                          for e, f, real in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DataError(
            f"{name}: {len(bad)} record file{'s' if len(bad) > 1 else ''} outside the dataset root "
            f"{root}: {shown}{more}. Paths listed in data files (and symlinks in the dataset) must "
            f"stay inside the dataset folder: fix the listing or copy the files under the root.")
    return len(checked)


def _entry_key(e: RecordEntry) -> tuple:
    """What makes two listings of a record the same (NaN equal to NaN)."""
    return (e.record_id, repr(e.locator), e.patient_id, e.split, tuple(e.labels),
            tuple(sorted((str(k), repr(v)) for k, v in e.extra.items())))


def _drop_repeated_entries(entries: list[RecordEntry], name: str):
    """``entries`` without identical repeats, and the ``(id, origin)`` of each repeat dropped."""
    positions: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        positions.setdefault(e.record_id, []).append(i)
    if len(positions) == len(entries):
        return entries, []
    drop, repeats, conflicts = set(), [], []
    for rid, pos in positions.items():
        if len(pos) < 2:
            continue
        keys = [_entry_key(entries[p]) for p in pos]
        if all(k == keys[0] for k in keys[1:]):
            drop.update(pos[1:])
            repeats.extend((rid, entries[p].origin or f"listing {p + 1}") for p in pos[1:])
        else:
            conflicts.append((rid, [entries[p] for p in pos]))
    if conflicts:
        shown = []
        for rid, listed in conflicts[:5]:
            where = ", ".join(e.origin for e in listed if e.origin)
            fields = []
            for label, get in (("split", lambda e: e.split or "(none)"), ("patient", lambda e: e.patient_id),
                               ("labels", lambda e: ",".join(e.labels) or "(none)"),
                               ("file", lambda e: str(e.locator)),
                               ("metadata", lambda e: repr(dict(e.extra)))):
                values = [get(e) for e in listed]
                if len(set(values)) > 1:
                    fields.append(f"{label} {' / '.join(values)}")
            shown.append(f"record {rid} listed {len(listed)} times{f' ({where})' if where else ''} "
                         f"with different {', '.join(fields)}")
        more = f"; and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
        raise DataError(
            f"{name}: {len(conflicts)} record id{'s are' if len(conflicts) > 1 else ' is'} listed more "
            f"than once with different contents, so one record could sit in two splits or carry two "
            f"sets of labels: {'; '.join(shown)}{more}. List every record once (fix or restore the file).")
    return [e for i, e in enumerate(entries) if i not in drop], repeats


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
            first_line: dict[str, int] = {}
            for line, row in enumerate(reader, start=2):
                split = (row["split"] or "").strip()
                if split not in ("train", "val", "test"):
                    raise DataError(
                        f"folds file {p} line {line}: split '{split}' is not train, val or test.")
                record = (row[id_col] or "").strip()
                if record in out and out[record] != split:
                    raise DataError(
                        f"folds file {p}: record '{record}' is in split '{out[record]}' on line "
                        f"{first_line[record]} and in '{split}' on line {line}; list every record once.")
                first_line.setdefault(record, line)
                out[record] = split
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"folds file {p} is not a readable CSV file ({exc})") from None
    return out


def drop_duplicate_rows(table, key: str, path: str | Path, name: str) -> tuple[Any, dict, list[str]]:
    """``table`` (read by pandas from ``path``) with exact repeats of a row dropped.

    Rows that share ``key`` but differ in any other column are a :class:`DataError` naming
    the key values, their lines in ``path`` and what differs (such a record could land in two
    splits). Returns ``(table, integrity counts, notes)``.
    """
    if not table[key].duplicated().any():
        return table, {"duplicates_dropped": 0}, []
    same = table.duplicated(keep="first")
    kept = table[~same]
    conflicting = kept[kept[key].duplicated(keep=False)]
    if len(conflicting):
        groups = list(conflicting.groupby(key, sort=False))
        shown = []
        for value, group in groups[:5]:
            text = group.astype(str)
            differ = [c for c in text.columns if text[c].nunique() > 1]
            detail = "; ".join(f"{c} {' / '.join(text[c])}" for c in differ[:3])
            shown.append(f"{key} {value} on lines {', '.join(str(i + 2) for i in group.index)} ({detail})")
        more = f"; and {len(groups) - 5} more" if len(groups) > 5 else ""
        raise DataError(
            f"{name}: {path} lists {len(groups)} {key} value{'s' if len(groups) > 1 else ''} on several "
            f"rows with different contents, so one record could sit in two splits or carry two sets of "
            f"labels: {'; '.join(shown)}{more}. Each {key} must appear once: fix the file or restore "
            f"it from the release.")
    ids = sorted(set(table.loc[same, key].astype(str)))
    lines = [str(i + 2) for i in table.index[same]]
    note = (f"{name}: {int(same.sum())} row{'s' if same.sum() > 1 else ''} of {path} repeat an earlier row "
            f"exactly and {'were' if same.sum() > 1 else 'was'} dropped ({key} {', '.join(ids[:5])}"
            f"{', ...' if len(ids) > 5 else ''}; line{'s' if len(lines) > 1 else ''} {', '.join(lines[:5])}"
            f"{', ...' if len(lines) > 5 else ''})")
    return kept, {"duplicates_dropped": int(same.sum()), "duplicate_ids": ids[:100]}, [note]


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
        return Scan(entries, class_names, list(rs.dropped), [], integrity=dict(rs.integrity))

    def read(self, entry: RecordEntry) -> RawRecord:
        """Row ``entry.locator`` of the loaded RecordSet."""
        rs = self._loaded()
        return RawRecord(np.asarray(rs.signals[entry.locator]), tuple(rs.leads), float(rs.sampling_rate))
