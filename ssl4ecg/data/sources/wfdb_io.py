"""Fast WFDB reading: a strict header parser and direct readers for the common sample formats.

Parsing a header with :mod:`wfdb` costs 3-4 ms, which caps dataset preparation at a few
hundred records per second per core. This module parses the header text itself (about
0.1 ms for 12 leads) and reads single-segment records in formats 16, 61, 80, 24, 32 and 212
(one sample per frame, no skew) straight into numpy, including the PhysioNet/CinC
challenge ``.mat`` files (MAT v4 holding ``val``, described by the header as format 16
with a byte offset). Everything else (multi-segment records, other formats, several
samples per frame, MAT v5 files) goes through :func:`wfdb.rdrecord` or
:func:`scipy.io.loadmat`. Every problem is one :class:`~ssl4ecg.errors.DataError` naming
the file.

The files a header names (signal files, segments) must lie inside the dataset root (or the
header's folder when no root is given) once symlinks are resolved; a header must list as
many signals as it declares, with distinct lead names.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np

from ssl4ecg.data.preprocess import canonical_lead
from ssl4ecg.errors import DataError

_FORMAT_RE = re.compile(r"^(\d+)(?:x(\d+))?(?::(\d+))?(?:\+(\d+))?$")
#: formats read directly (others fall back to wfdb)
FAST_FORMATS = {16, 61, 80, 24, 32, 212}
_INVALID = {16: -32768, 61: -32768, 80: -128, 24: -(2**23), 32: -(2**31), 212: -2048}
DEFAULT_GAIN = 200.0
DEFAULT_FS = 250.0
#: gains outside float32's normal range (signals are scaled in float32)
_GAIN_RANGE = (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max))


@dataclass
class SignalInfo:
    """One signal line of a WFDB header."""

    file_name: str
    fmt: int
    samples_per_frame: int = 1
    skew: int = 0
    byte_offset: int = 0
    gain: float = DEFAULT_GAIN
    baseline: int = 0
    units: str = "mV"
    adc_zero: int = 0
    name: str = ""


@dataclass
class Header:
    """A parsed WFDB header (``.hea``)."""

    path: Path
    record_name: str
    n_sig: int
    fs: float
    n_samples: int | None
    signals: list[SignalInfo] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    multi_segment: bool = False

    @property
    def lead_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.signals)

    def comment_fields(self) -> dict[str, str]:
        """``# Key: value`` comment lines as a dict (``{'Age': '59', 'Dx': '...'}``)."""
        out: dict[str, str] = {}
        for line in self.comments:
            key, sep, value = line.partition(":")
            if sep:
                out[key.strip()] = value.strip()
        return out


def _bad(path: Path, what: str) -> DataError:
    return DataError(f"corrupt WFDB header {path}: {what}")


def parse_header(path: str | Path, root: str | Path | None = None) -> Header:
    """Parse a ``.hea`` file; a :class:`DataError` names the file and the faulty line.

    The header and the files it names must lie inside ``root``, symlinks resolved; without
    a root, the files it names must lie in the header's folder (or below it).
    """
    path = Path(path)
    folder = _real_folder(path)
    if root is not None:
        inside, where = _real(root), "the dataset root"
        real = os.path.join(folder, path.name)
        real = os.path.realpath(real) if os.path.islink(real) else real
        if not _within(real, inside):
            raise DataError(f"WFDB header {path} leads to {real}, outside the dataset root {inside}; "
                            f"records must lie inside the dataset folder")
    else:
        inside, where = folder, "the header's folder"
    try:
        text = path.read_bytes().decode("latin-1")
    except OSError as exc:
        raise DataError(f"cannot read WFDB header {path}: {exc.strerror or exc}") from None
    lines = [ln.strip() for ln in text.splitlines()]
    comments = [ln.lstrip("#").strip() for ln in lines if ln.startswith("#")]
    body = [ln for ln in lines if ln and not ln.startswith("#")]
    if not body:
        raise _bad(path, "no record line")
    head = body[0].split()
    if len(head) < 2:
        raise _bad(path, f"record line '{body[0]}' needs a name and a signal count")
    name = head[0]
    multi = "/" in name
    try:
        n_sig = int(head[1])
        fs = float(head[2].split("/")[0].split("(")[0]) if len(head) > 2 else DEFAULT_FS
        n_samples = int(head[3]) if len(head) > 3 else None
    except ValueError:
        raise _bad(path, f"record line '{body[0]}' is not 'name n_sig fs n_samples'") from None
    if n_sig < 0 or not math.isfinite(fs) or fs <= 0 or (n_samples is not None and n_samples < 0):
        raise _bad(path, f"record line '{body[0]}' has impossible values")
    header = Header(path, name, n_sig, fs, n_samples, comments=comments, multi_segment=multi)
    if multi:  # segment lines follow; read through wfdb, but only from inside the dataset
        for line in body[1:1 + n_sig]:
            segment = line.split()[0]
            if segment != "~":
                seg = path.parent / (segment + ".hea")
                _confine(path, segment, folder, inside, where, "segment", ".hea")
                if seg.is_file():
                    parse_header(seg, inside)
        return header
    if len(body) < 1 + n_sig:
        raise _bad(path, f"{n_sig} signals announced, {len(body) - 1} signal lines found")
    if len(body) > 1 + n_sig:
        raise DataError(f"inconsistent WFDB header {path}: declares {n_sig} signals, lists "
                        f"{len(body) - 1} signal lines")
    for line in body[1:1 + n_sig]:
        header.signals.append(_parse_signal_line(path, line))
    _check_unique_leads(path, header.lead_names)
    for file_name in {s.file_name for s in header.signals}:
        if file_name != "-":
            _confine(path, file_name, folder, inside, where, "signal file")
    return header


@lru_cache(maxsize=64)
def _real(root: str | Path) -> str:
    """The dataset root with ``~`` expanded and symlinks resolved (cached: one per dataset)."""
    return os.path.realpath(os.path.expanduser(os.fspath(root)))


def _within(real: str, inside: str) -> bool:
    """Whether the resolved path ``real`` is ``inside`` or below it (string test: pathlib is slow)."""
    return real == inside or real.startswith(inside.rstrip(os.sep) + os.sep)


def _real_folder(path: Path) -> str:
    """The resolved folder holding ``path`` (the files a header names are relative to it)."""
    return os.path.realpath(path.parent)


def _confine(header: Path, name: str, folder: str, inside: str, where: str, what: str,
             suffix: str = "") -> None:
    """:class:`DataError` when ``name`` (read from ``header``, relative to ``folder``) leaves ``inside``."""
    real = os.path.join(folder, name + suffix)  # an absolute name replaces the folder
    if os.sep in name or name in (".", "..") or os.path.islink(real):
        real = os.path.realpath(real)
    if not _within(real, inside):
        raise DataError(f"WFDB header {header}: {what} '{name}' leads to {real}, outside {where} "
                        f"{inside}; the files a header names must lie inside the dataset folder")


def _check_unique_leads(path: Path, names) -> None:
    """:class:`DataError` when two signals carry the same lead (``I`` twice, or ``I`` and ``DI``)."""
    canonical = [canonical_lead(n) for n in names if str(n).strip()]
    if len(set(canonical)) == len(canonical):
        return
    seen: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if str(name).strip():
            seen.setdefault(canonical_lead(name), []).append(i + 1)
    repeated = {lead: pos for lead, pos in seen.items() if len(pos) > 1}
    if repeated:
        shown = "; ".join(f"{lead} (signals {', '.join(map(str, pos))})" for lead, pos in repeated.items())
        raise DataError(f"WFDB header {path} has duplicate lead names: {shown}; which signal is the "
                        f"lead is ambiguous, so the record is not used")


def _parse_signal_line(path: Path, line: str) -> SignalInfo:
    tok = line.split()
    if len(tok) < 2:
        raise _bad(path, f"signal line '{line}' needs a file name and a format")
    if "\x00" in tok[0]:
        raise _bad(path, f"signal line '{line}': file name holds a NUL byte")
    if tok[1].isascii() and tok[1].isdigit():  # the common case: no samples-per-frame, skew or offset
        info = SignalInfo(file_name=tok[0], fmt=int(tok[1]))
    else:
        m = _FORMAT_RE.match(tok[1])
        if not m:
            raise _bad(path, f"signal line '{line}': format '{tok[1]}' is not understood")
        info = SignalInfo(file_name=tok[0], fmt=int(m.group(1)), samples_per_frame=int(m.group(2) or 1),
                          skew=int(m.group(3) or 0), byte_offset=int(m.group(4) or 0))
    baseline_given = False
    if len(tok) > 2:
        gain_text, _, units = tok[2].partition("/")
        gain_text, paren, baseline = gain_text.partition("(")
        try:
            gain = float(gain_text)
            if paren:
                if not baseline.endswith(")"):
                    raise ValueError
                info.baseline, baseline_given = int(baseline[:-1]), True
        except ValueError:
            raise _bad(path, f"signal line '{line}': gain '{tok[2]}' is not understood") from None
        if not math.isfinite(gain):
            raise _bad(path, f"signal line '{line}': gain '{tok[2]}' is not finite")
        if gain != 0 and not _GAIN_RANGE[0] <= abs(gain) <= _GAIN_RANGE[1]:
            raise _bad(path, f"signal line '{line}': gain '{tok[2]}' is out of range")
        info.gain = gain if gain != 0 else DEFAULT_GAIN
        if units:
            info.units = units
    if len(tok) > 4:
        try:
            info.adc_zero = int(tok[4])
        except ValueError:
            raise _bad(path, f"signal line '{line}': ADC zero '{tok[4]}' is not an integer") from None
    if not baseline_given:
        info.baseline = info.adc_zero
    if not -2**63 <= info.baseline < 2**63:
        raise _bad(path, f"signal line '{line}': baseline {info.baseline} is out of range")
    info.name = " ".join(tok[8:]) if len(tok) > 8 else ""
    return info


def _fast_readable(header: Header) -> bool:
    return (not header.multi_segment and header.n_sig > 0 and all(
        s.fmt in FAST_FORMATS and s.samples_per_frame == 1 and s.skew == 0 and s.file_name != "-"
        for s in header.signals))


def read_record(record: str | Path, root: str | Path | None = None) -> tuple[Header, np.ndarray]:
    """Header and physical signal ``[n_sig, T]`` float32 (invalid samples as NaN).

    ``record`` is the record path without extension (``.../00009_lr``) or the ``.hea`` path;
    its files must lie inside ``root`` (see :func:`parse_header`).
    """
    record = Path(record)
    hea = record if record.suffix == ".hea" else record.with_name(record.name + ".hea")
    header = parse_header(hea, root)
    if not _fast_readable(header):
        return header, _read_with_wfdb(header)
    digital = _read_digital(header)  # [T, n_sig], frame-major as stored
    gain = np.array([s.gain for s in header.signals], dtype=np.float32)
    base = np.array([s.baseline for s in header.signals], dtype=np.float32)
    physical = (digital.astype(np.float32) - base) / gain
    invalid = np.array([_INVALID[s.fmt] for s in header.signals])
    bad = digital == invalid
    if bad.any():
        physical[bad] = np.nan
    return header, np.ascontiguousarray(physical.T)


def _read_digital(header: Header) -> np.ndarray:
    """Digital samples ``[T, n_sig]`` from the signal files named in the header."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(header.signals):
        groups.setdefault(s.file_name, []).append(i)
    n = header.n_samples
    blocks = []
    for file_name, rows in groups.items():
        first = header.signals[rows[0]]
        if any(header.signals[r].fmt != first.fmt for r in rows):
            return _read_with_wfdb_digital(header)
        path = header.path.parent / file_name
        offset = first.byte_offset
        block = None
        if path.suffix.lower() == ".mat":
            mat_offset = _mat4_offset(path, len(rows), n, offset)
            if mat_offset is None:
                block = _read_mat_val(path, len(rows), n)
            offset = mat_offset
        if block is None:
            block = _read_format(path, first.fmt, len(rows), n, offset)
        n = block.shape[0] if n is None else n
        if block.shape[0] != n:
            raise DataError(f"signal files of {header.path} hold different numbers of samples")
        blocks.append((rows, block))
    if len(blocks) == 1 and blocks[0][0] == list(range(header.n_sig)):
        return blocks[0][1]
    out = np.empty((n, header.n_sig), dtype=np.int64)
    for rows, block in blocks:
        out[:, rows] = block
    return out


def _read_format(path: Path, fmt: int, n_sig: int, n_samples: int | None, offset: int) -> np.ndarray:
    """``[T, n_sig]`` digital samples of one interleaved signal file."""
    try:
        size = path.stat().st_size - offset
    except OSError:
        raise DataError(f"signal file {path} is missing (named in {path.with_suffix('.hea').name})") from None
    if size < 0:
        raise DataError(f"signal file {path} is shorter than its byte offset {offset}")
    bytes_per = {16: 2, 61: 2, 80: 1, 24: 3, 32: 4, 212: 1.5}[fmt]
    available = int(size / bytes_per) // n_sig
    if n_samples is None:
        n_samples = available
    elif available < n_samples:
        raise DataError(
            f"signal file {path} is truncated: it holds {available} samples per signal, "
            f"the header announces {n_samples}")
    count = n_samples * n_sig
    with path.open("rb") as fh:
        fh.seek(offset)
        if fmt in (16, 61, 32):
            dtype = {16: "<i2", 61: ">i2", 32: "<i4"}[fmt]
            flat = np.fromfile(fh, dtype=dtype, count=count)
        elif fmt == 80:
            flat = np.fromfile(fh, dtype="u1", count=count).astype(np.int16) - 128
        elif fmt == 24:
            raw = np.fromfile(fh, dtype="u1", count=3 * count).reshape(-1, 3).astype(np.int32)
            flat = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
            flat[flat >= 2**23] -= 2**24
        else:  # 212: two 12-bit samples in three bytes
            n_bytes = (3 * count + 1) // 2
            raw = np.fromfile(fh, dtype="u1", count=n_bytes).astype(np.int16)
            if len(raw) % 3:
                raw = np.concatenate([raw, np.zeros(3 - len(raw) % 3, dtype=np.int16)])
            raw = raw.reshape(-1, 3)
            pair = np.empty((len(raw), 2), dtype=np.int16)
            pair[:, 0] = raw[:, 0] | ((raw[:, 1] & 0x0F) << 8)
            pair[:, 1] = raw[:, 2] | ((raw[:, 1] & 0xF0) << 4)
            flat = pair.reshape(-1)[:count]
            flat[flat >= 2048] -= 4096
    if flat.size < count:
        raise DataError(f"signal file {path} is truncated ({flat.size} of {count} samples)")
    return flat.reshape(n_samples, n_sig)


def _mat4_offset(path: Path, n_sig: int, n_samples: int | None, offset: int) -> int | None:
    """Byte offset of ``val`` in a MAT v4 challenge file, or ``None`` if it is not one."""
    try:
        with path.open("rb") as fh:
            head = fh.read(20)
            if len(head) < 20:
                raise DataError(f"signal file {path} is truncated (no MAT header)")
            mopt, mrows, ncols, imagf, namlen = np.frombuffer(head, dtype="<i4")
            if not (0 < namlen < 64):
                return None
            name = fh.read(int(namlen)).rstrip(b"\x00")
    except OSError:
        raise DataError(f"signal file {path} is missing") from None
    # MAT v4, little endian, int16 full matrix named 'val' with one row per signal
    if mopt != 30 or imagf != 0 or name != b"val" or mrows != n_sig:
        return None
    if n_samples is not None and ncols != n_samples:
        raise DataError(
            f"signal file {path} holds {ncols} samples per signal, its header announces {n_samples}")
    return 20 + int(namlen)


def _read_mat_val(path: Path, n_sig: int, n_samples: int | None) -> np.ndarray:
    """The ``val`` variable of a (non-v4) .mat file, checked against the header."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), variable_names=["val"])
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for corrupt files
        raise DataError(f"cannot read {path} as a MATLAB file: {exc}") from None
    if "val" not in mat:
        raise DataError(f"{path} has no variable 'val' (the challenge format stores the signal there)")
    val = np.asarray(mat["val"])
    if val.ndim != 2 or val.shape[0] != n_sig:
        raise DataError(f"{path}: 'val' has shape {val.shape}, expected ({n_sig}, samples)")
    if val.dtype.kind not in "biuf":  # text, cells, structs or complex numbers
        raise DataError(f"{path}: 'val' holds {val.dtype} values, expected real numbers")
    if n_samples is not None and val.shape[1] < n_samples:
        raise DataError(f"{path} is truncated: 'val' has {val.shape[1]} samples, header announces {n_samples}")
    val = val[:, :n_samples] if n_samples is not None else val
    return np.ascontiguousarray(val.T)


#: bytes per sample of the uncompressed formats wfdb reads (to check file sizes first)
_BYTES_PER_SAMPLE = {8: Fraction(1), 16: Fraction(2), 61: Fraction(2), 80: Fraction(1), 160: Fraction(2),
                     212: Fraction(3, 2), 310: Fraction(4, 3), 311: Fraction(4, 3), 24: Fraction(3),
                     32: Fraction(4)}


def _check_sizes(header: Header) -> None:
    """:class:`DataError` when a signal file is too short for the samples the header announces.

    wfdb allocates the announced signal before reading it, so a corrupt sample count would
    otherwise cost gigabytes before the read fails.
    """
    if header.n_samples is None:
        return
    files: dict[str, list[SignalInfo]] = {}
    for s in header.signals:
        files.setdefault(s.file_name, []).append(s)
    for file_name, signals in files.items():
        if file_name == "-" or any(s.fmt not in _BYTES_PER_SAMPLE for s in signals):
            continue
        frame = sum(s.samples_per_frame * _BYTES_PER_SAMPLE[s.fmt] for s in signals)
        need = signals[0].byte_offset + int(header.n_samples * frame)
        path = header.path.parent / file_name
        try:
            size = path.stat().st_size
        except OSError:
            continue  # wfdb names the missing file
        if size < need:
            raise DataError(f"signal file {path} is truncated: it holds {size} bytes, the header "
                            f"announces {header.n_samples} samples per signal ({need} bytes)")


def _read_with_wfdb(header: Header) -> np.ndarray:
    """Physical signal through :func:`wfdb.rdrecord` (the general fallback)."""
    import wfdb

    _check_sizes(header)
    record_path = str(header.path.with_suffix(""))
    try:
        rec = wfdb.rdrecord(record_path)
    except Exception as exc:  # noqa: BLE001 - wfdb raises many types for broken records
        raise DataError(f"cannot read WFDB record {record_path}: {type(exc).__name__}: {exc}") from None
    if rec.p_signal is None:
        raise DataError(f"WFDB record {record_path} has no signal")
    if header.multi_segment or not header.signals:
        _check_unique_leads(header.path, rec.sig_name)
        header.signals = [SignalInfo(file_name="", fmt=0, name=n) for n in rec.sig_name]
        header.n_sig = len(rec.sig_name)
        header.fs = float(rec.fs)
    return np.asarray(rec.p_signal, dtype=np.float32).T.copy()


def _read_with_wfdb_digital(header: Header) -> np.ndarray:
    import wfdb

    _check_sizes(header)
    record_path = str(header.path.with_suffix(""))
    try:
        rec = wfdb.rdrecord(record_path, physical=False, return_res=64)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read WFDB record {record_path}: {type(exc).__name__}: {exc}") from None
    return np.asarray(rec.d_signal, dtype=np.int64)
