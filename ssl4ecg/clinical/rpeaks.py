"""Multi-lead R-peak detection with per-lead quality (see ``docs/clinical_features.md``).

The detector works on all leads at once, so one noisy or disconnected lead cannot hide or
invent beats:

1. every lead is band-passed to the QRS band (8-20 Hz), differentiated and squared; each lead's
   energy is scaled by its own 98th percentile and clipped, so every lead contributes at most
   a bounded share and a lead with a huge artefact cannot dominate;
2. the mean of these envelopes over the usable leads is integrated over 100 ms (centred, so
   no delay) and its peaks at least 200 ms apart are candidates;
3. candidates above 40 % of a robust reference height (the median of the largest few) are
   beats; of two beats less than 360 ms apart the one under half the other's height is a T
   wave; gaps longer than 1.6 median RR are searched again at half the threshold;
4. each lead's quality is the ratio of its envelope at the beats to its envelope elsewhere;
   leads below ``min_lead_snr`` are dropped and the detection is repeated without them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import signal as sps

#: QRS band used for detection (Hz); the upper edge is capped below Nyquist
QRS_BAND = (8.0, 20.0)
#: a candidate is a beat above this fraction of the reference height (median of the largest few)
THRESHOLD = 0.4
#: shortest allowed RR interval (s): 300 bpm
REFRACTORY_S = 0.2
#: a lead whose beat-to-background envelope ratio is below this is not used
MIN_LEAD_SNR = 3.0


@dataclass
class Detection:
    """R-peak detection result for one record.

    ``peaks`` are sample indices of the R fiducial (the maximum of the combined QRS energy);
    ``good_leads`` flags the leads used (finite, not flat, beat SNR >= the threshold);
    ``lead_snr`` is each lead's beat-to-background envelope ratio (NaN for unusable leads).
    """

    peaks: np.ndarray
    good_leads: np.ndarray
    lead_snr: np.ndarray


@functools.lru_cache(maxsize=64)
def _sos_bandpass(low: float, high: float, fs: float, order: int = 2) -> np.ndarray:
    """Second-order sections of a Butterworth band-pass (``high`` capped below Nyquist)."""
    high = min(high, 0.45 * fs)
    return sps.butter(order, [low, high], btype="bandpass", fs=fs, output="sos")


def usable_leads(sig: np.ndarray) -> np.ndarray:
    """Bool ``[L]``: the lead has only finite values and is not flat."""
    finite = np.isfinite(sig).all(axis=1)
    spread = np.zeros(len(sig))
    if finite.any():
        spread[finite] = np.ptp(sig[finite], axis=1)
    return finite & (spread > 1e-9)




def qrs_energy(sig: np.ndarray, fs: float) -> np.ndarray:
    """Per-lead QRS energy ``[L, T]``: squared derivative of the QRS band, scaled and clipped.

    Each lead is divided by its own 98th percentile and clipped at 2, so every lead has a
    bounded vote in the combined envelope.
    """
    sos = _sos_bandpass(*QRS_BAND, fs)
    padlen = min(sig.shape[1] - 1, int(fs))
    band = sps.sosfiltfilt(sos, sig, axis=1, padlen=padlen)
    energy = np.gradient(band, axis=1) ** 2
    scale = np.percentile(energy, 98, axis=1, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)
    return np.minimum(energy / scale, 2.0)


def _moving_average(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average along the last axis (same length)."""
    width = max(1, int(width))
    kernel = np.ones(width) / width
    if x.ndim == 1:
        return np.convolve(x, kernel, mode="same")
    return np.stack([np.convolve(row, kernel, mode="same") for row in x])


def _pick_beats(env: np.ndarray, fs: float) -> np.ndarray:
    """Beat positions on a combined, integrated envelope (thresholding with search-back)."""
    distance = max(1, int(round(REFRACTORY_S * fs)))
    cand, props = sps.find_peaks(env, distance=distance, height=0.0)
    if len(cand) == 0:
        return cand
    heights = props["peak_heights"]
    seconds = len(env) / fs
    k = int(min(len(heights), max(3, round(0.5 * seconds))))
    reference = float(np.median(np.sort(heights)[-k:]))
    if reference <= 0:
        return np.array([], dtype=int)
    sel = heights >= THRESHOLD * reference
    beats, bh = cand[sel], heights[sel]
    if len(beats) > 1:  # T-wave rule: of two candidates < 360 ms apart, drop one under half the other
        keep = [0]
        for j in range(1, len(beats)):
            prev = keep[-1]
            close = beats[j] - beats[prev] < 0.36 * fs
            if close and bh[j] < 0.5 * bh[prev]:
                continue
            if close and bh[prev] < 0.5 * bh[j]:
                keep[-1] = j
                continue
            keep.append(j)
        beats = beats[keep]
    # search back in long gaps at half the threshold
    if len(beats) >= 2:
        added = []
        rr = float(np.median(np.diff(beats)))
        edges = np.concatenate([[-rr], beats, [len(env) - 1 + rr]])
        for a, b in zip(edges[:-1], edges[1:]):
            if b - a <= 1.6 * rr:
                continue
            lo, hi = a + 0.36 * rr, b - 0.36 * rr
            inside = (cand > lo) & (cand < hi) & (heights >= 0.15 * reference)
            inside &= (cand >= 0) & (cand < len(env))
            if inside.any():
                idx = np.flatnonzero(inside)
                added.append(cand[idx[np.argmax(heights[idx])]])
        if added:
            beats = np.sort(np.concatenate([beats, added]))
    # a candidate at the very edge whose QRS is cut off is not a beat
    edge = int(round(0.05 * fs))
    return beats[(beats >= edge) & (beats < len(env) - edge)]


def detect_r_peaks(sig: np.ndarray, fs: float, min_lead_snr: float = MIN_LEAD_SNR) -> Detection:
    """Detect R peaks on a multi-lead record ``sig [L, T]`` sampled at ``fs`` Hz.

    Returns a :class:`Detection`; ``peaks`` is empty when no lead is usable or no beat is found.
    """
    sig = np.asarray(sig, dtype=np.float64)
    if sig.ndim == 1:
        sig = sig[None]
    n_leads, n = sig.shape
    ok = usable_leads(sig)
    snr = np.full(n_leads, np.nan)
    if not ok.any() or n < int(fs):
        return Detection(np.array([], dtype=int), np.zeros(n_leads, bool), snr)
    energy = np.zeros_like(sig)
    energy[ok] = qrs_energy(sig[ok], fs)
    width = max(1, int(round(0.1 * fs)))
    lead_env = _moving_average(energy, width)

    use = ok.copy()
    beats = np.array([], dtype=int)
    for _ in range(2):
        env = lead_env[use].mean(axis=0)
        beats = _pick_beats(env, fs)
        if len(beats) < 2:
            break
        # beat SNR per lead: envelope at the beats vs. the envelope between beats
        near = np.zeros(n, bool)
        half = max(1, int(round(0.1 * fs)))
        for b in beats:
            near[max(0, b - half): b + half + 1] = True
        at_beats = np.median(lead_env[:, beats], axis=1)
        background = np.median(lead_env[:, ~near], axis=1) if (~near).any() else np.zeros(n_leads)
        snr = np.where(ok, at_beats / np.maximum(background, 1e-3), np.nan)
        good = ok & (snr >= min_lead_snr)
        if not good.any():  # keep the best lead rather than nothing
            good = ok & (snr == np.nanmax(snr))
        if np.array_equal(good, use):
            break
        use = good
    # refine each beat to the maximum of the combined energy smoothed over 50 ms, within +-60 ms
    # (the raw energy has two nearly equal maxima, on the up- and the down-stroke of R, and
    # jumping between them would add tens of ms of jitter to the RR intervals)
    if len(beats):
        raw = _moving_average(energy[use].mean(axis=0), max(1, int(round(0.05 * fs))))
        half = max(1, int(round(0.06 * fs)))
        refined = np.array([max(0, b - half) + int(np.argmax(raw[max(0, b - half): b + half + 1]))
                            for b in beats])
        keep = np.concatenate([[True], np.diff(refined) >= max(1, int(round(REFRACTORY_S * fs)))])
        beats = refined[keep]
    return Detection(beats.astype(int), use, snr)
