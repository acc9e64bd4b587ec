"""Compare R-peak detection and QRS delineation with wfdb and (if installed) neurokit2.

``python -m ssl4ecg.clinical.compare [--ptbxl DIR] [--n-synthetic N] [--n-real N]`` prints
accuracy against the synthetic ground truth, agreement on real PTB-XL records and the time
per record of each method. The numbers in ``docs/clinical_features.md`` come from this script.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import signal as sps

from ssl4ecg.clinical.features import FEATURE_NAMES, record_features
from ssl4ecg.clinical.rpeaks import detect_r_peaks


def mean_heart_rate(peaks: np.ndarray, fs: float) -> float:
    """Heart rate (bpm) from beat positions: 60 / mean RR; NaN with fewer than two beats."""
    peaks = np.asarray(peaks, dtype=float)
    if len(peaks) < 2 or peaks[-1] <= peaks[0]:
        return float("nan")
    return 60.0 * fs * (len(peaks) - 1) / (peaks[-1] - peaks[0])


def xqrs_heart_rate(lead: np.ndarray, fs: float, rate: float = 250.0) -> float:
    """Heart rate from ``wfdb.processing.xqrs_detect`` on one lead, resampled to ``rate`` Hz.

    XQRS is tuned for >= 250 Hz; at 100 Hz it takes T waves for beats, so the lead is
    resampled first (polyphase) when ``fs`` is lower than ``rate``.
    """
    import wfdb.processing as wp

    x = np.asarray(lead, dtype=np.float64)
    if fs < rate:
        from fractions import Fraction

        frac = Fraction(rate / fs).limit_denominator(100)
        x = sps.resample_poly(x, frac.numerator, frac.denominator)
        fs = fs * frac.numerator / frac.denominator
    return mean_heart_rate(wp.xqrs_detect(x, fs, verbose=False), fs)


def gqrs_heart_rate(lead: np.ndarray, fs: float, scale: float = 0.3) -> float:
    """Heart rate from ``wfdb.processing.gqrs_detect`` (thresholds assume mV; ``scale`` adapts z-scored leads)."""
    import wfdb.processing as wp

    return mean_heart_rate(wp.gqrs_detect(np.asarray(lead, np.float64) * scale, fs), fs)


def neurokit_heart_rate(lead: np.ndarray, fs: float) -> float:
    """Heart rate from neurokit2's default cleaning + R-peak detector on one lead."""
    import neurokit2 as nk

    clean = nk.ecg_clean(np.asarray(lead, np.float64), sampling_rate=int(fs))
    _, info = nk.ecg_peaks(clean, sampling_rate=int(fs))
    return mean_heart_rate(info["ECG_R_Peaks"], fs)


def neurokit_qrs_ms(lead: np.ndarray, fs: float) -> float:
    """Median QRS duration (ms) from neurokit2's DWT delineation (R onset to R offset) on one lead."""
    import neurokit2 as nk

    x = nk.ecg_clean(np.asarray(lead, np.float64), sampling_rate=int(fs))
    _, info = nk.ecg_peaks(x, sampling_rate=int(fs))
    _, waves = nk.ecg_delineate(x, info["ECG_R_Peaks"], sampling_rate=int(fs), method="dwt")
    on = np.asarray(waves["ECG_R_Onsets"], dtype=float)
    off = np.asarray(waves["ECG_R_Offsets"], dtype=float)
    n = min(len(on), len(off))
    d = (off[:n] - on[:n]) / fs * 1000.0
    d = d[np.isfinite(d) & (d > 0)]
    return float(np.median(d)) if len(d) else float("nan")


def _timed(fn: Callable[[int], float], n: int) -> tuple[np.ndarray, float]:
    """``fn(i)`` for i < n (NaN on exceptions) and the mean time per call in ms."""
    out = np.full(n, np.nan)
    start = time.perf_counter()
    for i in range(n):
        try:
            out[i] = fn(i)
        except Exception:  # noqa: BLE001 - a method failing on a record counts as a miss
            out[i] = np.nan
    return out, 1000.0 * (time.perf_counter() - start) / max(1, n)


def _within(a: np.ndarray, b: np.ndarray, tol: float) -> float:
    """Share of records where both are finite and ``|a - b| <= tol`` (NaN counts as a miss)."""
    return float(np.mean(np.abs(np.nan_to_num(a - b, nan=np.inf)) <= tol))


def load_ptbxl_records(root: Path, n: int | None = None) -> tuple[np.ndarray, list[str], float]:
    """The first ``n`` 100 Hz records of a PTB-XL folder as ``[N, 12, T]`` (via ``wfdb.rdsamp``)."""
    import csv

    import wfdb

    with open(root / "ptbxl_database.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if n is not None:
        rows = rows[:n]
    sigs, leads, fs = [], None, None
    for row in rows:
        x, meta = wfdb.rdsamp(str(root / row["filename_lr"]))
        sigs.append(x.T.astype(np.float32))
        leads, fs = meta["sig_name"], float(meta["fs"])
    return np.stack(sigs), list(leads), float(fs)


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ptbxl", type=Path, default=None, help="ptbxl-mini folder (100 Hz WFDB)")
    parser.add_argument("--n-synthetic", type=int, default=300)
    parser.add_argument("--n-real", type=int, default=None)
    parser.add_argument("--sampling-rate", type=float, default=500.0)
    parser.add_argument("--no-neurokit", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    use_nk = not args.no_neurokit
    if use_nk:
        try:
            import neurokit2  # noqa: F401
        except ImportError:
            print("neurokit2 not installed: skipped")
            use_nk = False

    from ssl4ecg.data.synthetic import SyntheticSource

    fs = args.sampling_rate
    rs = SyntheticSource(n_records=args.n_synthetic, sampling_rate=fs, seed=7).load()
    n = len(rs)
    ii = list(rs.leads).index("II")
    hr_true, qrs_true = rs.extra["heart_rate"], rs.extra["qrs_ms"]
    print(f"synthetic: {n} records at {fs:g} Hz (seed 7)")
    own = np.stack([record_features(x, rs.leads, fs) for x in rs.signals[:1]])  # warm-up
    start = time.perf_counter()
    own = np.stack([record_features(x, rs.leads, fs) for x in rs.signals])
    t_own = 1000.0 * (time.perf_counter() - start) / n
    hr_col, qrs_col = FEATURE_NAMES.index("heart_rate"), FEATURE_NAMES.index("qrs_ms")
    rows = [("ssl4ecg (12-lead)", _within(own[:, hr_col], hr_true, 2),
             _within(own[:, qrs_col], qrs_true, 10), t_own)]
    det_only, t_det = _timed(lambda i: mean_heart_rate(detect_r_peaks(rs.signals[i], fs).peaks, fs), n)
    rows.append(("ssl4ecg R peaks only", _within(det_only, hr_true, 2), float("nan"), t_det))
    hr, t = _timed(lambda i: xqrs_heart_rate(rs.signals[i, ii], fs), n)
    rows.append(("wfdb xqrs (II)", _within(hr, hr_true, 2), float("nan"), t))
    hr, t = _timed(lambda i: gqrs_heart_rate(rs.signals[i, ii], fs, scale=1.0), n)
    rows.append(("wfdb gqrs (II)", _within(hr, hr_true, 2), float("nan"), t))
    if use_nk:
        hr, t = _timed(lambda i: neurokit_heart_rate(rs.signals[i, ii], fs), n)
        rows.append(("neurokit2 peaks (II)", _within(hr, hr_true, 2), float("nan"), t))
        q, t = _timed(lambda i: neurokit_qrs_ms(rs.signals[i, ii], fs), n)
        rows.append(("neurokit2 dwt delineation (II)", float("nan"), _within(q, qrs_true, 10), t))
    print(f"{'method':34s} {'HR<=2bpm':>9s} {'QRS<=10ms':>10s} {'ms/record':>10s}")
    for name, a, b, t in rows:
        print(f"{name:34s} {a:9.3f} {b:10.3f} {t:10.1f}")

    if args.ptbxl is not None:
        x, leads, rfs = load_ptbxl_records(args.ptbxl, args.n_real)
        m = len(x)
        li = leads.index("II")
        print(f"\nptbxl: {m} records at {rfs:g} Hz; agreement = |HR difference| <= 5 bpm")
        own_hr, t_own = _timed(lambda i: mean_heart_rate(detect_r_peaks(x[i], rfs).peaks, rfs), m)
        ref, t_ref = _timed(lambda i: xqrs_heart_rate(x[i, li], rfs), m)
        methods = {"ssl4ecg (12-lead)": (own_hr, t_own), "wfdb xqrs@250Hz (II)": (ref, t_ref)}
        hr, t = _timed(lambda i: xqrs_heart_rate(x[i, li], rfs, rate=rfs), m)
        methods["wfdb xqrs@100Hz (II)"] = (hr, t)
        hr, t = _timed(lambda i: gqrs_heart_rate(x[i, li], rfs), m)
        methods["wfdb gqrs (II, x0.3)"] = (hr, t)
        if use_nk:
            methods["neurokit2 (II)"] = _timed(lambda i: neurokit_heart_rate(x[i, li], rfs), m)
        names = list(methods)
        print(f"{'':24s}" + "".join(f"{k[:14]:>15s}" for k in names) + f"{'ms/record':>11s}")
        for a in names:
            print(f"{a:24s}" + "".join(f"{_within(methods[a][0], methods[b][0], 5):15.3f}" for b in names)
                  + f"{methods[a][1]:11.1f}")


if __name__ == "__main__":
    main()
