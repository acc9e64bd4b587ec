"""Median-beat delineation: QRS onset/offset, P onset, T end (see ``docs/clinical_features.md``).

Beats found by :func:`ssl4ecg.clinical.rpeaks.detect_r_peaks` are aligned on the QRS by
cross-correlation (sub-sample, parabolic interpolation) and averaged sample by sample with the
median, which removes noise and a minority of ectopic beats. Records below 400 Hz are first
interpolated (linearly) to >= 400 Hz. All wave boundaries are measured *globally* on the median
beats of the good leads, the way diagnostic ECG programs do:

* QRS core: the run of samples around R where the spatial velocity
  ``sqrt(sum_l (dM_l/dt)^2)`` exceeds ``QRS_CORE_FRACTION`` of its peak (gaps shorter than
  ``QRS_GAP_S`` bridged, so notched and slurred QRS complexes stay whole);
* QRS onset: walking back from the core, where the velocity falls below
  ``QRS_VELOCITY_FRACTION`` of its peak or reaches a clear local minimum;
* baseline of every lead: the median beat in the 20 ms before QRS onset (PR segment);
* QRS offset (J point): the earliest point within ``OFFSET_WINDOW_S`` of the core's end where
  the spatial magnitude (baseline removed) is within ``OFFSET_NOISE_K`` noise levels of its
  minimum there -- the terminal QRS returns towards baseline and the ST segment then moves
  away from it (ST elevation or depression), so the J point is the magnitude's minimum;
* P wave: the peak of the 20 Hz low-passed spatial magnitude between the end of the previous
  T wave and 50 ms before QRS onset; P onset where the magnitude falls to
  ``P_ONSET_FRACTION`` of the wave's height above the floor before it; no P (PR = NaN) when
  the wave is not clearly above the noise and a minimal share of the QRS (e.g. in AF);
* T end: tangent method on the spatial magnitude, i.e. the steepest descent after the T peak
  extrapolated to the level the magnitude returns to.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import signal as sps

from ssl4ecg.clinical.rpeaks import Detection

#: seconds of signal kept before / after the R fiducial in a beat window
PRE_S, POST_S = 0.45, 0.8
#: QRS onset: velocity threshold as a fraction of (peak - isoelectric level)
QRS_VELOCITY_FRACTION = 0.04
#: P onset: magnitude threshold, as a fraction of the P wave's height above the floor before it
P_ONSET_FRACTION = 0.1
#: longest P search before QRS onset (s); PR intervals up to ~340 ms are found
P_SEARCH_S = 0.34
#: a P wave must be this many times the noise level and this fraction of the QRS magnitude
P_MIN_SNR, P_MIN_QRS_RATIO = 4.0, 0.03


@dataclass
class Delineation:
    """Fiducial points of one record, in seconds relative to the median beat's R fiducial.

    ``beat`` is the median beat ``[L, W]`` with each lead's baseline removed (NaN for leads not
    measured), ``t`` its time axis in seconds, ``r_times`` the refined R times in seconds from the
    record start. A boundary that cannot be measured is NaN.
    """

    beat: np.ndarray
    t: np.ndarray
    r_times: np.ndarray
    n_beats: int
    qrs_on: float
    qrs_off: float
    p_on: float
    p_peak: float
    t_peak: float
    t_end: float


#: delineation runs at this sampling rate or above (lower rates are interpolated up)
MIN_DELINEATION_RATE = 400.0
#: velocity is the difference over +-this many seconds (a short symmetric smoother)
VELOCITY_HALF_SPAN_S = 0.004
#: a gap in QRS activity shorter than this (s) does not end the QRS (notched / slurred QRS)
QRS_GAP_S = 0.02
#: the QRS core (notches bridged) is where the velocity exceeds this fraction of its peak
QRS_CORE_FRACTION = 0.1
#: half-width (s) of the neighbourhood a boundary's velocity minimum must be the minimum of
LOCAL_MIN_S = 0.004
#: the J point is searched within +-this (s) of the end of the QRS core
OFFSET_WINDOW_S = 0.03
#: ... as the earliest point within this many noise levels of the smallest spatial magnitude
OFFSET_NOISE_K = 2.0


def _filtered(sig: np.ndarray, fs: float) -> tuple[np.ndarray, int]:
    """0.5 Hz high-pass (zero phase), linear interpolation up to >= 400 Hz, 100 Hz low-pass.

    Returns the filtered ``[L, T * k]`` signal and the up-sampling factor ``k``.
    """
    padlen = min(sig.shape[1] - 1, int(3 * fs))
    sos = _butter(2, 0.5, "highpass", fs)
    out = sps.sosfiltfilt(sos, sig, axis=1, padlen=padlen)
    k = max(1, int(np.ceil(MIN_DELINEATION_RATE / fs)))
    if k > 1:
        # linear interpolation is local: band-limited (polyphase) interpolation rings around
        # the sharp QRS edges of a 100 Hz record and moves the boundaries by several ms
        t_in = np.arange(out.shape[1], dtype=np.float64)
        t_up = np.arange(out.shape[1] * k, dtype=np.float64) / k
        out = np.stack([np.interp(t_up, t_in, row) for row in out])
    fs_d = fs * k
    if fs_d > 250:
        sos = _butter(2, 100.0, "lowpass", fs_d)
        out = sps.sosfiltfilt(sos, out, axis=1, padlen=min(out.shape[1] - 1, int(fs_d)))
    return out, k


@functools.lru_cache(maxsize=64)
def _butter(order: int, cutoff, btype: str, fs: float) -> np.ndarray:
    """Cached Butterworth second-order sections."""
    return sps.butter(order, cutoff, btype=btype, fs=fs, output="sos")


def _windows(sig: np.ndarray, centers: np.ndarray, pre: int, post: int) -> np.ndarray:
    """Beat windows ``[B, L, pre + post + 1]`` around integer ``centers``, NaN outside the record."""
    n = sig.shape[1]
    offsets = np.arange(-pre, post + 1)
    idx = centers[:, None] + offsets[None, :]
    inside = (idx >= 0) & (idx < n)
    win = sig[:, np.clip(idx, 0, n - 1)].transpose(1, 0, 2)
    return np.where(inside[:, None, :], win, np.nan)


def _nanmedian_beat(win: np.ndarray, min_count: int) -> np.ndarray:
    """Median over beats (axis 0, NaN = missing), NaN where fewer than ``min_count`` beats cover a sample."""
    count = np.isfinite(win).sum(axis=0)  # [L, W]
    srt = np.sort(win, axis=0)  # NaN sorts last
    lo = np.clip((count - 1) // 2, 0, None)
    hi = np.clip(count // 2, 0, None)
    med = 0.5 * (np.take_along_axis(srt, lo[None], axis=0)[0] + np.take_along_axis(srt, hi[None], axis=0)[0])
    med[count < max(1, min_count)] = np.nan
    return med


def _align(x: np.ndarray, centers: np.ndarray, template: np.ndarray, pre: int, fs: float,
           leads: np.ndarray) -> np.ndarray:
    """Sub-sample shift (samples) of every beat that best matches ``template`` around the QRS."""
    half = max(2, int(round(0.06 * fs)))
    max_shift = max(1, int(round(0.02 * fs)))
    tpl = template[leads, pre - half: pre + half + 1]
    if not np.isfinite(tpl).all():
        return np.zeros(len(centers))
    tpl = tpl - tpl.mean(axis=1, keepdims=True)  # then sum(seg * tpl) ignores the segment's mean
    span = half + max_shift
    seg = _windows(x[leads], centers, span, span)  # [B, Lg, 2 span + 1]
    width = 2 * half + 1
    scores = np.stack([np.einsum("blj,lj->b", seg[:, :, s: s + width], tpl)
                       for s in range(2 * max_shift + 1)], axis=1)  # NaN where cut off
    scores = np.where(np.isfinite(scores), scores, -np.inf)
    best = np.argmax(scores, axis=1)
    shifts = (best - max_shift).astype(float)
    rows = np.arange(len(centers))
    inner = (best > 0) & (best < 2 * max_shift)
    if inner.any():
        r, b = rows[inner], best[inner]
        left, mid, right = scores[r, b - 1], scores[r, b], scores[r, b + 1]
        den = left - 2 * mid + right
        ok = np.isfinite(den) & (den < 0)
        frac = np.zeros(len(r))
        frac[ok] = 0.5 * (left[ok] - right[ok]) / den[ok]
        shifts[r] += np.clip(frac, -0.5, 0.5)
    shifts[~np.isfinite(scores.max(axis=1))] = 0.0
    return shifts


def _noise_level(beat: np.ndarray, fs: float) -> float:
    """Typical noise magnitude of a median beat: the median over time of the spatial magnitude of
    its residual from a 10 ms moving average."""
    k = max(1, int(round(0.005 * fs)))
    kernel = np.ones(2 * k + 1) / (2 * k + 1)
    resid = beat - np.stack([np.convolve(row, kernel, mode="same") for row in beat])
    return float(np.nanmedian(np.sqrt(np.sum(resid ** 2, axis=0))))


def _velocity(beat: np.ndarray, fs: float) -> np.ndarray:
    """Spatial velocity ``sqrt(sum_l (dM_l/dt)^2)`` with a symmetric difference over +-4 ms."""
    h = max(1, int(round(VELOCITY_HALF_SPAN_S * fs)))
    d = np.full_like(beat, np.nan)
    d[:, h:-h] = (beat[:, 2 * h:] - beat[:, :-2 * h]) * (fs / (2 * h))
    return np.sqrt(np.sum(d ** 2, axis=0))


def _edge(curve: np.ndarray, level: float, start: int, step: int, limit: int, gap: int) -> float:
    """Where activity (``curve > level``) ends, walking from ``start`` by ``step``.

    Activity ends at the first run of ``gap`` samples below ``level``; the result is the
    fractional index of the crossing after the last active sample (NaN if not found within
    ``limit`` samples or at NaN values).
    """
    n = len(curve)
    last = start
    run = 0
    i = start
    while True:
        i += step
        if not (0 <= i < n) or abs(i - start) > limit or not np.isfinite(curve[i]):
            return np.nan
        if curve[i] > level:
            last, run = i, 0
        else:
            run += 1
            if run >= gap:
                break
    a, b = curve[last], curve[last + step]
    frac = (a - level) / (a - b) if a != b else 0.0
    return last + step * float(np.clip(frac, 0.0, 1.0))


def _settle(curve: np.ndarray, level: float, start: int, step: int, limit: int, fs: float) -> float:
    """From ``start`` walk by ``step`` to where ``curve`` falls below ``level`` or has a clear local minimum.

    The local minimum (the slope change at a wave boundary, e.g. the J point where the ST
    segment starts to rise) counts when it is a minimum over +-``LOCAL_MIN_S`` and below half
    the value at ``start``. Returns a fractional index, NaN if neither happens within ``limit``.
    """
    n = len(curve)
    w = max(1, int(round(LOCAL_MIN_S * fs)))
    ref = curve[start] if 0 <= start < n else np.nan
    i = start
    while abs(i - start) <= limit:
        nxt = i + step
        if not (0 <= nxt < n) or not np.isfinite(curve[nxt]):
            return np.nan
        if curve[nxt] <= level:
            a, b = curve[i], curve[nxt]
            frac = (a - level) / (a - b) if a != b else 0.0
            return i + step * float(np.clip(frac, 0.0, 1.0))
        lo, hi = max(0, nxt - w), min(n, nxt + w + 1)
        if curve[nxt] < 0.5 * ref and curve[nxt] <= np.nanmin(curve[lo:hi]):
            return float(nxt)
        i = nxt
    return np.nan


def _crossing(curve: np.ndarray, level: float, start: int, step: int, stop: int) -> float:
    """First fractional index from ``start`` (moving by ``step``) where ``curve`` drops below ``level``."""
    i = start
    while i != stop:
        nxt = i + step
        if not (0 <= nxt < len(curve)) or not np.isfinite(curve[nxt]):
            return np.nan
        if curve[nxt] <= level:
            a, b = curve[i], curve[nxt]
            frac = (a - level) / (a - b) if a != b else 0.0
            return i + step * float(np.clip(frac, 0.0, 1.0))
        i = nxt
    return np.nan


def delineate(sig: np.ndarray, fs: float, detection: Detection) -> Delineation | None:
    """Median beat and global fiducial points of ``sig [L, T]``; ``None`` with fewer than 2 beats."""
    peaks = detection.peaks
    good = detection.good_leads
    if len(peaks) < 2 or not good.any():
        return None
    usable = np.isfinite(sig).all(axis=1)
    filtered, k = _filtered(np.asarray(sig[usable], dtype=np.float64), fs)
    x = np.zeros((len(sig), filtered.shape[1]))
    x[usable] = filtered
    fs_d = fs * k
    pre, post = int(round(PRE_S * fs_d)), int(round(POST_S * fs_d))
    centers = peaks * k
    min_count = max(1, len(peaks) // 3)
    first = _nanmedian_beat(_windows(x, centers, pre, post), min_count)
    shifts = _align(x, centers, first, pre, fs_d, good)
    beat = _nanmedian_beat(_windows(x, centers + np.rint(shifts).astype(int), pre, post), min_count)
    beat[~usable] = np.nan
    r_times = (centers + shifts) / fs_d
    t = (np.arange(beat.shape[1]) - pre) / fs_d
    out = Delineation(beat=beat, t=t, r_times=r_times, n_beats=len(peaks), qrs_on=np.nan,
                      qrs_off=np.nan, p_on=np.nan, p_peak=np.nan, t_peak=np.nan, t_end=np.nan)
    rr = float(np.median(np.diff(r_times)))

    # ---- QRS onset / offset from the spatial velocity
    vel = _velocity(beat[good], fs_d)
    core_half = int(round(0.06 * fs_d))
    core = vel[pre - core_half: pre + core_half + 1]
    if not np.isfinite(core).all():
        return out
    ic = pre - core_half + int(np.argmax(core))
    vmax = float(vel[ic])
    floor = float(np.nanpercentile(vel, 10))
    level = floor + QRS_VELOCITY_FRACTION * (vmax - floor)
    high = floor + QRS_CORE_FRACTION * (vmax - floor)
    gap = max(1, int(round(QRS_GAP_S * fs_d)))
    on_hi = _edge(vel, high, ic, -1, int(round(0.2 * fs_d)), gap)
    off_hi = _edge(vel, high, ic, +1, int(round(0.25 * fs_d)), gap)
    if not (np.isfinite(on_hi) and np.isfinite(off_hi)):
        return out
    on = _settle(vel, level, int(np.floor(on_hi)), -1, int(round(0.06 * fs_d)), fs_d)
    if not np.isfinite(on):
        return out
    # ---- baseline: the PR segment (20 ms just before QRS onset) of every lead
    i_on = int(np.floor(on))
    b0 = max(0, i_on - max(1, int(round(0.02 * fs_d))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows of unusable leads
        base = np.nanmean(beat[:, b0: i_on + 1], axis=1)
    beat = beat - base[:, None]
    out.beat = beat
    g = beat[good]
    mag = np.sqrt(np.sum(g ** 2, axis=0))
    noise_m = _noise_level(g, fs_d)
    w = int(round(OFFSET_WINDOW_S * fs_d))
    lo, hi = max(ic + 1, int(off_hi) - w), min(len(mag) - 2, int(off_hi) + w)
    seg = mag[lo: hi + 1]
    if hi <= lo or not np.isfinite(seg).all():
        return out
    # the earliest point within noise of the smallest magnitude (a flat ST segment after the
    # J point must not pull the offset later)
    cand = np.flatnonzero(seg <= seg.min() + OFFSET_NOISE_K * noise_m)
    off = float(lo + int(cand[0]))
    out.qrs_on, out.qrs_off = (on - pre) / fs_d, (off - pre) / fs_d

    # ---- T wave: peak of the spatial magnitude after the ST segment, tangent-method end
    t_lo = int(np.ceil(off + 0.06 * fs_d))
    t_hi = min(len(mag) - 1, int(np.floor(on + min(0.7, 0.85 * rr) * fs_d)))
    if t_hi - t_lo > 3 and np.isfinite(mag[t_lo: t_hi + 1]).all():
        ip = t_lo + int(np.argmax(mag[t_lo: t_hi + 1]))
        slope = np.gradient(mag)
        tail = slope[ip: t_hi + 1]
        if len(tail) > 1 and np.min(tail) < 0:
            js = ip + int(np.argmin(tail))
            iso = float(np.min(mag[js: t_hi + 1]))  # the level the T wave returns to
            end = js + (iso - mag[js]) / slope[js]
            if ip < end <= t_hi + 0.1 * fs_d:
                out.t_peak = (ip - pre) / fs_d
                out.t_end = (end - pre) / fs_d

    # ---- P wave: peak of the 20 Hz low-passed spatial magnitude between the previous T wave
    # and the QRS; its onset is where the magnitude falls to 10 % above the floor before it
    prev_t_end = (out.t_end - rr) * fs_d + pre if np.isfinite(out.t_end) else -np.inf
    p_lo = int(np.ceil(max(0.0, on - P_SEARCH_S * fs_d, prev_t_end + 0.02 * fs_d)))
    p_hi = int(np.floor(on - 0.05 * fs_d))
    if p_hi - p_lo > 3 and np.isfinite(g[:, p_lo: i_on + 1]).all():
        raw = g[:, p_lo: i_on + 1]
        low = sps.sosfiltfilt(_butter(2, 20.0, "lowpass", fs_d), raw, axis=1,
                              padlen=min(raw.shape[1] - 1, int(0.05 * fs_d)))
        pmag = np.sqrt(np.sum(low ** 2, axis=0))
        ip = int(np.argmax(pmag[: p_hi - p_lo + 1]))
        peak = float(pmag[ip])
        i_off = int(np.ceil(off))
        qrs_mag = float(np.nanmax(np.sqrt(np.sum(g[:, i_on: i_off + 1] ** 2, axis=0))))
        if ip > 0:
            floor = float(np.min(pmag[:ip]))
            height = peak - floor
            if height > P_MIN_QRS_RATIO * qrs_mag and height > P_MIN_SNR * noise_m:
                p_on = _crossing(pmag, floor + P_ONSET_FRACTION * height, ip, -1, 0)
                if np.isfinite(p_on):
                    out.p_peak = (ip + p_lo - pre) / fs_d
                    out.p_on = (p_on + p_lo - pre) / fs_d
    return out
