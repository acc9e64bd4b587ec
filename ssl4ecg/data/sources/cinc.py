"""PhysioNet/CinC Challenge 2020/2021 records: WFDB ``.hea`` + ``.mat`` with SNOMED-CT ``# Dx:``.

This is how CPSC2018, CPSC-Extra, St Petersburg INCART, PTB, PTB-XL, Georgia,
Chapman-Shaoxing and Ningbo are distributed by the challenge
(https://physionet.org/content/challenge-2021/). The source walks ``path`` recursively for
``.hea`` files; ``# Age:``, ``# Sex:`` and ``# Dx:`` header comments go to ``extra``
(``age``, ``sex`` 1 = female / 0 = male, ``dx`` = all codes). A label map turns codes into
classes; codes outside the map are recorded in ``extra['dx_unmapped']`` and counted in the
notes, never fatal.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from ssl4ecg.data.sources.base import (
    RawRecord, RecordEntry, RecordSource, Scan, check_choice, check_fractions, parse_age,
    parse_sex, read_split_file, real_root, require_dir, seeded_splits,
)
from ssl4ecg.data.sources.wfdb_io import parse_header, read_record
from ssl4ecg.errors import DataError

URL = "https://physionet.org/content/challenge-2021/"

#: CPSC2018's nine classes (Liu et al. 2018) and the SNOMED-CT codes the challenge data uses
#: for them; the alias codes are the equivalent statements other challenge sources use.
CPSC2018_CLASSES = ("NORM", "AF", "IAVB", "LBBB", "RBBB", "PAC", "PVC", "STD", "STE")
CPSC2018_MAP = {
    "426783006": "NORM",  # sinus rhythm
    "164889003": "AF",  # atrial fibrillation
    "270492004": "IAVB",  # 1st degree AV block
    "164909002": "LBBB",  # left bundle branch block
    "733534002": "LBBB",  # complete left bundle branch block (alias)
    "59118001": "RBBB",  # right bundle branch block
    "713427006": "RBBB",  # complete right bundle branch block (alias)
    "284470004": "PAC",  # premature atrial contraction
    "63593006": "PAC",  # supraventricular premature beats (alias)
    "164884008": "PVC",  # ventricular ectopics (the code of CPSC2018's PVC class)
    "427172004": "PVC",  # premature ventricular contractions (alias)
    "17338001": "PVC",  # ventricular premature beats (alias)
    "429622005": "STD",  # ST depression
    "164931005": "STE",  # ST elevation
}

#: The 30 scored diagnoses of the 2021 challenge (abbreviations of dx_mapping_scored.csv).
_SCORED_2021 = {
    "164889003": "AF", "164890007": "AFL", "6374002": "BBB", "426627000": "Brady",
    "733534002": "LBBB", "164909002": "LBBB", "713427006": "RBBB", "59118001": "RBBB",
    "270492004": "IAVB", "713426002": "IRBBB", "39732003": "LAD", "445118002": "LAnFB",
    "164947007": "LPR", "251146004": "LQRSV", "111975006": "LQT", "698252002": "NSIVCB",
    "426783006": "NSR", "284470004": "PAC", "63593006": "PAC", "10370003": "PR",
    "365413008": "PRWP", "427172004": "PVC", "17338001": "PVC", "164917005": "QAb",
    "47665007": "RAD", "427393009": "SA", "426177001": "SB", "427084000": "STach",
    "164934002": "TAb", "59931005": "TInv",
}
#: 2020 scored 27 diagnoses: the 2021 set without BBB, CLBBB and PRWP
_SCORED_2020 = {k: v for k, v in _SCORED_2021.items() if k not in ("6374002", "733534002", "365413008")}

#: label maps: name -> (SNOMED code -> class). Equivalent codes the challenge scores as one
#: class (CRBBB/RBBB, PAC/SVPB, PVC/VPB and, in 2021, CLBBB/LBBB) share a class.
LABEL_MAPS: dict[str, dict[str, str]] = {
    "cpsc2018": CPSC2018_MAP,
    "challenge": _SCORED_2021,
    "challenge2021": _SCORED_2021,
    "challenge2020": _SCORED_2020,
    "none": {},
}


def class_names_of(label_map: str) -> tuple[str, ...] | None:
    """Class order of a label map (CPSC2018 in its published order, others sorted)."""
    if label_map == "none":
        return None
    if label_map == "cpsc2018":
        return CPSC2018_CLASSES
    return tuple(sorted(set(LABEL_MAPS[label_map].values())))


def find_files(root: Path, suffix: str) -> list[Path]:
    """Every file under ``root`` ending in ``suffix`` (case-insensitive), sorted, hidden ones skipped.

    Symlinked folders are not entered; a symlinked file that leads outside ``root`` is a
    :class:`DataError` (records are only read from inside the dataset folder).
    """
    found, outside = [], []
    inside = str(real_root(root)).rstrip(os.sep) + os.sep
    stack = [str(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                items = list(it)
        except OSError:
            continue
        for item in items:
            if item.name.startswith("."):
                continue
            if item.is_dir():
                if not item.is_symlink():
                    stack.append(item.path)
            elif item.name.lower().endswith(suffix):
                if item.is_symlink() and not os.path.realpath(item.path).startswith(inside):
                    outside.append(f"{item.path} -> {os.path.realpath(item.path)}")
                found.append(Path(item.path))
    if outside:
        raise DataError(
            f"{len(outside)} {suffix} file{'s' if len(outside) > 1 else ''} under {root} "
            f"{'are symlinks' if len(outside) > 1 else 'is a symlink'} leading outside it "
            f"({'; '.join(outside[:3])}{'; ...' if len(outside) > 3 else ''}); records are only read "
            f"from inside the dataset folder: copy the files in or point [data] path at their folder.")
    return sorted(found)


def record_id_of(path: Path, root: Path) -> str:
    """Relative path without extension, ``/``-separated (unique inside a dataset tree)."""
    return path.relative_to(root).with_suffix("").as_posix()


def header_extra(fields: dict[str, str]) -> dict:
    """``age``/``sex`` numbers from header comment fields (missing ones left out)."""
    extra = {}
    if "Age" in fields:
        extra["age"] = parse_age(fields["Age"])
    if "Sex" in fields:
        extra["sex"] = parse_sex(fields["Sex"])
    return extra


class CinCSource(RecordSource):
    """PhysioNet/CinC 2020/2021 challenge records (.hea + .mat) with SNOMED-CT Dx labels.

    ``label_map``: ``cpsc2018`` (9 classes), ``challenge`` / ``challenge2021`` (26 scored
    classes, equivalent codes merged), ``challenge2020`` (24) or ``none`` (unlabelled).
    Records without a mapped code are dropped unless ``keep_unlabelled``. Splits come from
    ``folds_file`` (CSV: record, split) or a seeded stratified rule.
    """

    name = "cinc"

    def __init__(
        self,
        path: str = "",
        label_map: str = "cpsc2018",
        keep_unlabelled: bool = False,
        folds_file: str = "",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
    ) -> None:
        self.path = str(path)
        self.label_map = check_choice("label_map", label_map, LABEL_MAPS)
        self.keep_unlabelled = bool(keep_unlabelled)
        self.folds_file = str(folds_file)
        check_fractions(val_fraction, test_fraction)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.split_seed = int(split_seed)

    def scan(self) -> Scan:
        """Parse every header: Dx codes to labels, Age/Sex to extra; assign splits."""
        root = require_dir(self.path, "PhysioNet/CinC challenge data",
                           "WFDB .hea + .mat records (any depth)", URL)
        headers = find_files(root, ".hea")
        if not headers:
            raise DataError(f"no WFDB header (.hea) found under {root}: expected the PhysioNet/CinC "
                            f"2020/2021 training folders; get them from {URL}")
        mapping = LABEL_MAPS[self.label_map]
        class_names = class_names_of(self.label_map)
        entries, dropped, notes = [], [], []
        unmapped: dict[str, int] = {}
        for hea in headers:
            rid = record_id_of(hea, root)
            try:
                header = parse_header(hea, root)
            except DataError as exc:
                dropped.append((rid, str(exc)))
                continue
            fields = header.comment_fields()
            codes = [c.strip() for c in fields.get("Dx", "").split(",") if c.strip()]
            labels = sorted({mapping[c] for c in codes if c in mapping})
            other = [c for c in codes if c not in mapping]
            if class_names is not None:
                for code in other:
                    unmapped[code] = unmapped.get(code, 0) + 1
            if class_names is not None and not labels and not self.keep_unlabelled:
                what = f"Dx {', '.join(codes)}" if codes else "no # Dx: line"
                dropped.append((rid, f"no code of label map '{self.label_map}' ({what})"))
                continue
            extra = header_extra(fields)
            extra["dx"] = ",".join(codes)
            extra["dx_unmapped"] = ",".join(other) if class_names is not None else ""
            entries.append(RecordEntry(rid, str(hea.with_suffix("")), rid, "", tuple(labels), extra,
                                       origin=f"found as {hea.relative_to(root)}"))
        if unmapped:
            invalid = sorted(c for c in unmapped if not c.isdigit())
            top = sorted(unmapped.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
            notes.append(f"cinc: {len(unmapped)} Dx codes outside label map '{self.label_map}' "
                         f"(kept in extra['dx_unmapped']); most frequent: "
                         + ", ".join(f"{c} x{n}" for c, n in top))
            if invalid:
                notes.append(f"cinc: Dx values that are not SNOMED-CT codes: {', '.join(invalid[:10])}")
        entries = self._assign_splits(entries, notes)
        split_origin = f"folds file {self.folds_file}" if self.folds_file else ""
        return Scan(entries, class_names, dropped, notes, root=str(root), split_origin=split_origin)

    def entry_files(self, entry: RecordEntry) -> list[str]:
        """The record's header (it names the signal file, checked when parsed)."""
        return [entry.locator + ".hea"]

    def _assign_splits(self, entries: list[RecordEntry], notes: list[str]) -> list[RecordEntry]:
        """Splits from the folds file, or from the seeded stratified rule."""
        if self.folds_file:
            table = read_split_file(self.folds_file)
            missing = [e.record_id for e in entries if e.record_id not in table]
            if missing:
                notes.append(f"{len(missing)} records are not in {self.folds_file} and stay unassigned "
                             f"(e.g. {', '.join(missing[:3])})")
            return [replace(e, split=table.get(e.record_id, "")) for e in entries]
        splits = seeded_splits([e.labels for e in entries], [e.patient_id for e in entries],
                               seed=self.split_seed, val_fraction=self.val_fraction,
                               test_fraction=self.test_fraction)
        return [replace(e, split=s) for e, s in zip(entries, splits)]

    def read(self, entry: RecordEntry) -> RawRecord:
        """The record's signal (MAT v4 ``val`` read directly; other files through wfdb/scipy)."""
        header, signal = read_record(entry.locator, root=self.path)
        if not header.signals:
            raise DataError(f"{entry.locator}.hea describes no signal")
        return RawRecord(signal, header.lead_names, header.fs)
