"""Clinical ECG features of a record and of a whole RecordSet, with an on-disk cache.

:func:`record_features` measures one record ``[L, T]``; :func:`extract_features` measures every
record of a :class:`~ssl4ecg.data.records.RecordSet` (optionally in worker processes);
:func:`features_for` does the same through a content-addressed cache and
:func:`attach_features` stores the result in ``records.extra`` so that it follows every
``subset``/``split``. A feature that cannot be measured is NaN, never 0.
See ``docs/clinical_features.md`` for the definitions and the accuracy measured.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import math
import multiprocessing
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ssl4ecg.clinical.delineation import Delineation, delineate
from ssl4ecg.clinical.rpeaks import Detection, detect_r_peaks

log = logging.getLogger("ssl4ecg.clinical")

#: bump when a definition or the algorithm changes: old caches are then ignored
VERSION = "1"
#: the 12 standard leads, in the order of the per-lead features
LEADS12: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
#: record-level features, then the ST level of every standard lead
GLOBAL_FEATURES: tuple[str, ...] = (
    "heart_rate", "sdnn_ms", "rmssd_ms", "pr_ms", "qrs_ms", "qt_ms", "qtc_bazett_ms",
    "qtc_fridericia_ms", "qrs_axis_deg", "sokolow_lyon", "cornell",
)
FEATURE_NAMES: tuple[str, ...] = GLOBAL_FEATURES + tuple(f"st60_{lead}" for lead in LEADS12)
#: units of every feature ("signal" = the unit of the input, mV for raw records)
FEATURE_UNITS: dict[str, str] = {
    "heart_rate": "bpm", "sdnn_ms": "ms", "rmssd_ms": "ms", "pr_ms": "ms", "qrs_ms": "ms",
    "qt_ms": "ms", "qtc_bazett_ms": "ms", "qtc_fridericia_ms": "ms", "qrs_axis_deg": "degree",
    "sokolow_lyon": "signal", "cornell": "signal",
    **{f"st60_{lead}": "signal" for lead in LEADS12},
}
#: prefix of the feature columns in ``RecordSet.extra``
EXTRA_PREFIX = "clin_"
#: fewest beats for RR variability (SDNN, RMSSD)
MIN_BEATS_HRV = 5

_LOWER = {lead.lower(): lead for lead in LEADS12}


def canonical_leads(leads: Sequence[str]) -> list[str | None]:
    """Standard names of ``leads`` (case-insensitive, ``AVF`` -> ``aVF``); ``None`` if unknown."""
    return [_LOWER.get(str(lead).strip().lower()) for lead in leads]


def _nan_vector() -> np.ndarray:
    return np.full(len(FEATURE_NAMES), np.nan, dtype=np.float32)


def _limb_net(net: dict[str, float]) -> tuple[float, float]:
    """Net QRS area of leads I and aVF, derived from II/III where a lead is missing."""
    def get(name):
        v = net.get(name, np.nan)
        return v if np.isfinite(v) else np.nan

    lead_i, lead_ii, lead_iii, lead_avf = get("I"), get("II"), get("III"), get("aVF")
    if not np.isfinite(lead_i):
        lead_i = lead_ii - lead_iii  # Einthoven: I = II - III
    if not np.isfinite(lead_avf):
        lead_avf = lead_ii - 0.5 * lead_i if np.isfinite(lead_ii) else 0.5 * (lead_i + 2 * lead_iii)
    return lead_i, lead_avf


def features_from(detection: Detection, fiducials: Delineation | None, leads: Sequence[str],
                  fs: float) -> np.ndarray:
    """The feature vector (``FEATURE_NAMES`` order) from a detection and a delineation."""
    out = _nan_vector()
    col = {name: i for i, name in enumerate(FEATURE_NAMES)}
    peaks = detection.peaks
    if len(peaks) < 2:
        return out
    r_times = fiducials.r_times if fiducials is not None else peaks / fs
    rr = np.diff(r_times)
    mean_rr = float(np.mean(rr))
    out[col["heart_rate"]] = 60.0 / mean_rr
    if len(peaks) >= MIN_BEATS_HRV:
        out[col["sdnn_ms"]] = 1000.0 * float(np.std(rr, ddof=1))
        out[col["rmssd_ms"]] = 1000.0 * float(np.sqrt(np.mean(np.diff(rr) ** 2)))
    if fiducials is None:
        return out
    d = fiducials
    if np.isfinite(d.qrs_on) and np.isfinite(d.qrs_off):
        out[col["qrs_ms"]] = 1000.0 * (d.qrs_off - d.qrs_on)
    if np.isfinite(d.p_on) and np.isfinite(d.qrs_on):
        out[col["pr_ms"]] = 1000.0 * (d.qrs_on - d.p_on)
    if np.isfinite(d.t_end) and np.isfinite(d.qrs_on):
        qt = d.t_end - d.qrs_on
        out[col["qt_ms"]] = 1000.0 * qt
        out[col["qtc_bazett_ms"]] = 1000.0 * qt / math.sqrt(mean_rr)
        out[col["qtc_fridericia_ms"]] = 1000.0 * qt / mean_rr ** (1.0 / 3.0)
    if not (np.isfinite(d.qrs_on) and np.isfinite(d.qrs_off)):
        return out

    # per-lead measurements on the baseline-corrected median beat of good leads
    names = canonical_leads(leads)
    t = d.t
    in_qrs = (t >= d.qrs_on - 0.5 / fs) & (t <= d.qrs_off + 0.5 / fs)
    j60 = d.qrs_off + 0.060
    net: dict[str, float] = {}
    r_amp: dict[str, float] = {}
    s_amp: dict[str, float] = {}
    for row, name in enumerate(names):
        if name is None or not detection.good_leads[row]:
            continue
        wave = d.beat[row]
        if not np.isfinite(wave[in_qrs]).all():
            continue
        q = wave[in_qrs]
        net[name] = float(np.trapezoid(q, dx=1.0 / fs))
        r_amp[name] = max(0.0, float(np.max(q)))
        s_amp[name] = max(0.0, float(-np.min(q)))
        if t[0] <= j60 <= t[-1]:
            st = float(np.interp(j60, t, wave))
            if np.isfinite(st):
                out[col[f"st60_{name}"]] = st
    lead_i, lead_avf = _limb_net(net)
    if np.isfinite(lead_i) and np.isfinite(lead_avf) and (lead_i != 0 or lead_avf != 0):
        # Einthoven's triangle: I = m cos(a), aVF = II - I/2 = m sqrt(3)/2 sin(a)
        out[col["qrs_axis_deg"]] = math.degrees(math.atan2(2.0 * lead_avf / math.sqrt(3.0), lead_i))
    if "V1" in s_amp and ("V5" in r_amp or "V6" in r_amp):
        out[col["sokolow_lyon"]] = s_amp["V1"] + max(r_amp.get("V5", -np.inf), r_amp.get("V6", -np.inf))
    if "aVL" in r_amp and "V3" in s_amp:
        out[col["cornell"]] = r_amp["aVL"] + s_amp["V3"]
    return out


def record_features(signal: np.ndarray, leads: Sequence[str], sampling_rate: float) -> np.ndarray:
    """Clinical features (``FEATURE_NAMES`` order, float32, NaN = not measurable) of ``signal [L, T]``."""
    sig = np.asarray(signal, dtype=np.float64)
    if sig.ndim != 2 or sig.shape[0] != len(leads):
        raise ValueError(f"signal must be [leads, T] with {len(leads)} leads, got shape {sig.shape}")
    fs = float(sampling_rate)
    detection = detect_r_peaks(sig, fs)
    fiducials = delineate(sig, fs, detection) if len(detection.peaks) >= 2 else None
    return features_from(detection, fiducials, leads, fs)


def measure_record(signal: np.ndarray, leads: Sequence[str], sampling_rate: float) -> dict[str, float]:
    """:func:`record_features` as a ``{name: value}`` dict (handy for one record)."""
    return dict(zip(FEATURE_NAMES, record_features(signal, leads, sampling_rate).tolist()))


def _chunk_features(signals: Any, leads: Sequence[str], fs: float) -> np.ndarray:
    """Features of every record in ``signals`` (an array or a list of ``[L, T]`` arrays)."""
    out = np.empty((len(signals), len(FEATURE_NAMES)), dtype=np.float32)
    for i in range(len(signals)):
        try:
            out[i] = record_features(np.asarray(signals[i]), leads, fs)
        except (ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
            log.warning("clinical features: record %d not measurable (%s)", i, exc)
            out[i] = _nan_vector()
    return out


def extract_features(records, workers: int = 1, chunk_size: int = 64) -> tuple[np.ndarray, list[str]]:
    """Clinical features of every record: ``([N, F] float32 with NaN, feature names)``.

    ``records`` is a RecordSet (signals ``[N, L, T]`` or a ragged list). With ``workers > 1``
    chunks of ``chunk_size`` records are measured in that many processes; the result does not
    depend on ``workers``.
    """
    leads = tuple(records.leads)
    fs = float(records.sampling_rate)
    n = len(records)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    starts = list(range(0, n, chunk_size))
    if workers == 1 or len(starts) <= 1:
        feats = _chunk_features(records.signals, leads, fs) if n else \
            np.zeros((0, len(FEATURE_NAMES)), np.float32)
        return feats, list(FEATURE_NAMES)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    parts: list[np.ndarray] = [None] * len(starts)  # type: ignore[list-item]
    with cf.ProcessPoolExecutor(min(workers, len(starts)),
                                mp_context=multiprocessing.get_context(method)) as pool:
        futures = {
            pool.submit(_chunk_features, [np.asarray(records.signals[i]) for i in
                                          range(s, min(n, s + chunk_size))], leads, fs): k
            for k, s in enumerate(starts)
        }
        for fut in cf.as_completed(futures):
            parts[futures[fut]] = fut.result()
    return np.concatenate(parts), list(FEATURE_NAMES)


# ----------------------------------------------------------------------------- caching

def default_cache_dir() -> Path:
    """``$SSL4ECG_CACHE_DIR/clinical`` or ``~/.cache/ssl4ecg/clinical``."""
    root = os.environ.get("SSL4ECG_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "ssl4ecg") / "clinical"


def content_key(records) -> str:
    """A hash of everything the features depend on: signals, leads, sampling rate, version."""
    h = hashlib.sha256()
    h.update(f"clinical-v{VERSION}|{tuple(records.leads)}|{float(records.sampling_rate)!r}|{len(records)}".encode())
    for i in range(len(records)):
        x = np.ascontiguousarray(np.asarray(records.signals[i], dtype=np.float32))
        h.update(str(x.shape).encode())
        h.update(x.tobytes())
    return h.hexdigest()[:24]


def save_features(path: str | Path, record_ids: Sequence[str], features: np.ndarray,
                  names: Sequence[str] = FEATURE_NAMES) -> Path:
    """Write features with their record ids and names to ``path`` (``.npz``, atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, features=np.asarray(features, np.float32), record_ids=np.asarray(record_ids).astype(str),
             names=np.asarray(list(names)), version=np.asarray(VERSION))
    os.replace(tmp, path)
    return path


def load_features(path: str | Path, record_ids: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]] | None:
    """Features saved by :func:`save_features`, rows reordered to ``record_ids``.

    ``None`` when the file is missing, of another version, or lacks one of ``record_ids``.
    """
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path) as z:
        if str(z["version"]) != VERSION:
            return None
        feats, ids, names = z["features"], z["record_ids"], [str(s) for s in z["names"]]
    if record_ids is None:
        return feats, names
    pos = {rid: i for i, rid in enumerate(ids.tolist())}
    try:
        rows = [pos[str(r)] for r in record_ids]
    except KeyError:
        return None
    return feats[rows], names


def features_for(records, cache_dir: str | Path | None = None, workers: int = 1,
                 use_cache: bool = True) -> tuple[np.ndarray, list[str]]:
    """Features of ``records``, computed once: from ``records.extra``, the cache, or measured.

    Order of lookup: the ``clin_*`` columns of ``records.extra`` (see :func:`attach_features`);
    the file ``<cache_dir>/<content_key>.npz`` (default :func:`default_cache_dir`); otherwise
    :func:`extract_features` runs and the result is written to that file.
    """
    cols = [EXTRA_PREFIX + name for name in FEATURE_NAMES]
    if all(c in records.extra for c in cols):
        return np.stack([np.asarray(records.extra[c], np.float32) for c in cols], axis=1), list(FEATURE_NAMES)
    path = None
    if use_cache:
        path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = path / f"{content_key(records)}.npz"
        cached = load_features(path, records.record_ids)
        if cached is not None and cached[1] == list(FEATURE_NAMES):
            return cached
    feats, names = extract_features(records, workers=workers)
    if path is not None:
        try:
            save_features(path, records.record_ids, feats, names)
        except OSError as exc:  # a read-only cache folder must not stop an evaluation
            log.warning("clinical features: cannot write cache %s (%s)", path, exc)
    return feats, names


def attach_features(records, features: np.ndarray | None = None, **kwargs: Any):
    """A copy of ``records`` whose ``extra`` holds every feature as column ``clin_<name>``.

    ``features`` defaults to :func:`features_for` ``(records, **kwargs)``.
    """
    from dataclasses import replace

    if features is None:
        features, _ = features_for(records, **kwargs)
    extra = dict(records.extra)
    for j, name in enumerate(FEATURE_NAMES):
        extra[EXTRA_PREFIX + name] = np.asarray(features[:, j], np.float32)
    return replace(records, extra=extra)


def clinical_targets(records) -> dict[str, np.ndarray]:
    """Every clinical feature as ``{name: float64 array [N]}`` (NaN = missing), via the cache.

    The signature the ``feature_regression`` evaluator expects of ``target_fn``::

        [[eval]]
        name = "feature_regression"
        targets = ["heart_rate", "qrs_ms", "qtc_bazett_ms"]
        target_fn = "ssl4ecg.clinical:clinical_targets"
    """
    feats, names = features_for(records)
    return {name: feats[:, j].astype(np.float64) for j, name in enumerate(names)}

