"""The embedded synthetic 12-lead ECG source: geometry, physiology, labels, ground truth, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage, signal

from ssl4ecg.data.synthetic import CLASS_NAMES, PRIMARY_SHARES, SyntheticSource
from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import STANDARD_LEADS

FS = 250.0  # tests run at 250 Hz to stay fast; the model is the same at any rate
LEAD = {name: i for i, name in enumerate(STANDARD_LEADS)}


@pytest.fixture(scope="module")
def noisy():
    """1,200 records with default noise (the quickstart's kind of data)."""
    return SyntheticSource(n_records=1200, sampling_rate=FS).load()


@pytest.fixture(scope="module")
def clean():
    """300 noise-free records: waves are separated by exactly flat segments."""
    return SyntheticSource(n_records=300, sampling_rate=FS, noise=0.0, seed=3).load()


def _single(records, name: str) -> np.ndarray:
    """Indices of records whose only label is ``name``."""
    k = CLASS_NAMES.index(name)
    return np.flatnonzero((records.labels[:, k] > 0) & (records.labels.sum(1) == 1))


def _flat_runs(x: np.ndarray, min_len: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """First and last sample of every run of >= ``min_len`` exactly-zero samples in all leads."""
    flat = np.abs(x.astype(np.float64)).sum(0) < 1e-6
    d = np.diff(np.r_[0, flat.astype(np.int8), 0])
    start, end = np.flatnonzero(d == 1), np.flatnonzero(d == -1) - 1
    keep = end - start + 1 >= min_len
    return start[keep], end[keep]


def _clean_beats(records, i: int, max_beats: int = 4) -> list[dict]:
    """Fiducials measured in a noise-free record: QRS onset, P onset, T end (sample indices).

    QRS onset = last flat sample before a steep deflection; P onset = last flat sample of the
    run before that (the TP segment); T end = first flat sample of the next run. Beats whose
    waves overlap (no flat TP segment) are skipped.
    """
    x = records.signals[i]
    start, end = _flat_runs(x)
    slope = np.abs(np.diff(x.astype(np.float64), axis=-1)).sum(0)
    beats = []
    for j, on in enumerate(end):
        if j == 0 or start[j] == 0 or on + int(0.6 * FS) >= x.shape[-1]:
            continue
        if slope[on:on + int(0.04 * FS)].max() < 0.25 * slope.max():
            continue  # a P wave follows this run, not a QRS
        later = start[start > on]
        if not len(later):
            continue
        beats.append({"on": int(on), "p_on": int(end[j - 1]), "t_end": int(later[0])})
        if len(beats) == max_beats:
            break
    return beats


# --------------------------------------------------------------------------- geometry and API

def test_recordset_shapes_dtypes_and_ids(noisy):
    assert noisy.signals.shape == (1200, 12, 2500)
    assert noisy.signals.dtype == np.float32
    assert np.isfinite(noisy.signals).all()
    assert tuple(noisy.leads) == STANDARD_LEADS and noisy.sampling_rate == FS
    assert noisy.labels.shape == (1200, 5) and noisy.labels.dtype == np.float32
    assert set(np.unique(noisy.labels)) == {0.0, 1.0}
    assert noisy.class_names == CLASS_NAMES == ("NORM", "MI", "STTC", "CD", "HYP")
    assert noisy.record_ids[0] == "syn00000" and noisy.record_ids[-1] == "syn01199"
    assert len(set(noisy.record_ids)) == 1200
    assert (noisy.patient_ids == noisy.record_ids).all()
    assert set(noisy.extra) == {"heart_rate", "qrs_ms", "pr_ms", "qt_ms"}
    for key, values in noisy.extra.items():
        assert values.dtype == np.float32 and values.shape == (1200,) and np.isfinite(values).all(), key
    batch = noisy.to_batch([0, 5])
    assert tuple(batch.signal.shape) == (2, 12, 2500) and set(batch.extra) == set(noisy.extra)


def test_default_geometry_and_registry_build():
    from ssl4ecg.data.sources import register
    from ssl4ecg.registry import Registry

    registry = Registry()
    register(registry)
    component = registry.get("source", "synthetic")
    assert component.options() == {
        "n_records": 1200, "sampling_rate": 500.0, "seconds": 10.0, "seed": 0,
        "val_fraction": 0.15, "test_fraction": 0.15, "noise": 1.0, "multi_label_fraction": 0.1,
    }
    records = registry.build("source", "synthetic", {"n_records": 6}, "data").load()
    assert records.signals.shape == (6, 12, 5000) and records.sampling_rate == 500.0
    with pytest.raises(ConfigError, match="n_record"):
        registry.build("source", "synthetic", {"n_record": 6}, "data")


def test_short_records_still_have_a_heart_rate():
    records = SyntheticSource(n_records=40, sampling_rate=FS, seconds=1.0).load()
    assert records.signals.shape == (40, 12, 250)
    hr = records.extra["heart_rate"]
    assert np.isfinite(hr).all() and hr.min() > 40 and hr.max() < 145


def test_same_seed_is_identical_and_seeds_differ():
    def make(seed):
        return SyntheticSource(n_records=70, sampling_rate=FS, seconds=4.0, seed=seed).load()

    a, b, c = make(7), make(7), make(8)
    assert np.array_equal(a.signals, b.signals)
    assert np.array_equal(a.labels, b.labels) and (a.splits == b.splits).all()
    assert all(np.array_equal(a.extra[k], b.extra[k]) for k in a.extra)
    assert not np.allclose(a.signals, c.signals)
    assert not np.array_equal(a.extra["heart_rate"], c.extra["heart_rate"])
    assert not np.array_equal(a.labels, c.labels)


# --------------------------------------------------------------------------- physiology

def test_limb_lead_relations_hold_with_noise(noisy):
    s = noisy.signals
    lead_i, lead_ii = s[:, LEAD["I"]], s[:, LEAD["II"]]
    np.testing.assert_allclose(s[:, LEAD["III"]], lead_ii - lead_i, atol=1e-6)
    np.testing.assert_allclose(s[:, LEAD["aVR"]], -(lead_i + lead_ii) / 2, atol=1e-6)
    np.testing.assert_allclose(s[:, LEAD["aVL"]], lead_i - lead_ii / 2, atol=1e-6)
    np.testing.assert_allclose(s[:, LEAD["aVF"]], lead_ii - lead_i / 2, atol=1e-6)
    # the precordial leads are not combinations of the limb leads
    a = np.stack([lead_i[:50].ravel(), lead_ii[:50].ravel()], 1)
    for v in ("V1", "V4", "V6"):
        y = s[:50, LEAD[v]].ravel()
        resid = y - a @ np.linalg.lstsq(a, y, rcond=None)[0]
        assert resid.std() > 0.3 * y.std(), v


def test_noise_components_and_scaling():
    def make(noise):
        return SyntheticSource(n_records=24, sampling_rate=FS, noise=noise, seed=5).load().signals

    clean, one, two = make(0.0), make(1.0), make(2.0)
    noise = (one - clean).astype(np.float64)
    # the heart is the same whatever `noise` is, and `noise` scales every noise component
    np.testing.assert_allclose(two - clean, 2 * noise, atol=1e-4)
    rms = np.sqrt((noise ** 2).mean())
    assert 0.01 < rms < 0.3  # mV: visible but far below the QRS
    lead_i = noise[:, LEAD["I"]]
    freqs = np.fft.rfftfreq(lead_i.shape[-1], 1 / FS)
    power = (np.abs(np.fft.rfft(lead_i, axis=-1)) ** 2).mean(0)
    wander = power[(freqs > 0) & (freqs < 0.5)].sum()
    band = power[(freqs >= 0.7) & (freqs < 40)].sum()
    assert wander > band  # baseline wander dominates the noise power
    # muscle noise is broadband: as strong at 70-120 Hz as at 20-45 Hz, and clearly present
    high = (freqs > 70) & (freqs < 120)
    floor = np.median(power[high])
    assert 0.5 < floor / np.median(power[(freqs > 20) & (freqs < 45)]) < 2.0
    assert np.sqrt(2 * power[high].sum()) / lead_i.shape[-1] > 0.003  # mV rms in 70-120 Hz
    for line in (50.0, 60.0):  # powerline peaks stand above the muscle-noise floor
        assert power[np.argmin(np.abs(freqs - line))] > 20 * floor


def test_heart_rate_matches_r_peak_count_and_rr_varies(noisy):
    sos = signal.butter(2, [5 / (FS / 2), 30 / (FS / 2)], "bandpass", output="sos")
    lead_ii = signal.sosfiltfilt(sos, noisy.signals[:, LEAD["II"]].astype(np.float64), axis=-1)
    energy = ndimage.uniform_filter1d(np.gradient(lead_ii, axis=-1) ** 2, int(0.08 * FS), axis=-1)
    estimate = np.full(len(energy), np.nan)
    rr_spread = np.zeros(len(energy))
    for i, row in enumerate(energy):
        peaks, _ = signal.find_peaks(row, distance=int(0.36 * FS), height=0.3 * np.percentile(row, 99))
        if len(peaks) >= 2:
            estimate[i] = 60.0 * FS * (len(peaks) - 1) / (peaks[-1] - peaks[0])
            rr_spread[i] = np.diff(peaks).std()
    truth = noisy.extra["heart_rate"]
    assert np.mean(np.abs(estimate - truth) <= 2.0) >= 0.95
    assert truth.min() > 40 and truth.max() < 135 and truth.max() - truth.min() > 60
    assert np.mean(rr_spread >= 1.0) > 0.8  # beat-to-beat RR variability (>= 1 sample = 4 ms)


def test_fiducials_measured_in_clean_signals_equal_ground_truth(clean):
    sample_ms = 1000.0 / FS
    pr_ok, qt_ok, qrs_end_err = [], [], []
    for i in np.flatnonzero(clean.extra["heart_rate"] < 80):
        beats = _clean_beats(clean, i)
        if not beats:
            continue
        pr = np.median([b["on"] - b["p_on"] for b in beats]) * sample_ms
        qt = np.median([b["t_end"] - b["on"] for b in beats]) * sample_ms
        # a wave starting between samples k and k+1 leaves sample k as the last flat one
        pr_ok.append(-0.01 <= pr - clean.extra["pr_ms"][i] <= sample_ms + 0.01)
        qt_ok.append(-0.01 <= qt - clean.extra["qt_ms"][i] <= sample_ms + 0.01)
        # visible end of the QRS (slope above 10 % of its peak) sits just inside the drawn span
        if clean.labels[i, CLASS_NAMES.index("NORM")]:
            on, x = beats[0]["on"], clean.signals[i].astype(np.float64)
            slope = np.abs(np.diff(x[:, on:on + int(0.2 * FS)], axis=-1)).sum(0)
            qrs_end_err.append(np.flatnonzero(slope > 0.1 * slope.max()).max() * sample_ms
                               - clean.extra["qrs_ms"][i])
    assert len(pr_ok) > 120
    assert np.mean(pr_ok) >= 0.95 and np.mean(qt_ok) >= 0.95
    assert -12.0 <= np.median(qrs_end_err) <= 0.0
    assert np.percentile(np.abs(qrs_end_err), 80) <= 12.0


def test_precordial_r_wave_progression(clean):
    norm = clean.signals[_single(clean, "NORM")]
    r = np.median(norm.max(-1), 0)  # baseline is exactly zero in clean records
    s = np.median(-norm.min(-1), 0)
    v = [LEAD[f"V{k}"] for k in range(1, 7)]
    assert r[v[0]] < r[v[1]] < r[v[2]] < r[v[3]]  # R grows from V1 to V4
    assert max(r[v[4]], r[v[5]]) > 2 * r[v[0]]
    assert s[v[0]] > s[v[4]] and s[v[1]] > s[v[5]]  # S shrinks towards V5/V6
    assert r[LEAD["aVR"]] < s[LEAD["aVR"]]  # aVR is negative in a normal axis


# --------------------------------------------------------------------------- label semantics

def test_conduction_delay_means_wide_qrs(noisy):
    qrs = noisy.extra["qrs_ms"]
    cd = noisy.labels[:, CLASS_NAMES.index("CD")] > 0
    assert (qrs[cd] >= 120).all() and (qrs[~cd] < 120).all()
    assert 80 <= np.median(qrs[_single(noisy, "NORM")]) <= 105
    pr, qt = noisy.extra["pr_ms"], noisy.extra["qt_ms"]
    assert (pr >= 100).all() and (pr <= 320).all() and (qt > qrs + 100).all() and (qt < 600).all()


def test_hypertrophy_means_high_voltage(noisy):
    sos = signal.butter(2, [0.5 / (FS / 2), 40 / (FS / 2)], "bandpass", output="sos")

    def sokolow(idx):  # S in V1 + the taller R of V5/V6 (mV), after a 0.5-40 Hz band-pass
        x = signal.sosfiltfilt(sos, noisy.signals[idx][:, [LEAD["V1"], LEAD["V5"], LEAD["V6"]]], axis=-1)
        return -x[:, 0].min(-1) + x[:, 1:].max(-1).max(1)

    hyp, norm = sokolow(_single(noisy, "HYP")), sokolow(_single(noisy, "NORM"))
    assert hyp.mean() > 1.3 * norm.mean()
    assert np.mean(hyp > 3.5) > 0.5 and np.mean(norm > 3.5) < 0.2


def test_infarction_and_st_t_changes_are_visible(clean):
    not_avr = [k for k, name in enumerate(STANDARD_LEADS) if name != "aVR"]

    def signs(idx):
        mi_sign, sttc_sign = [], []
        for i in idx:
            beats = _clean_beats(clean, i, max_beats=2)
            if not beats:
                continue
            x = clean.signals[i].astype(np.float64)
            on = beats[0]["on"]
            qrs = clean.extra["qrs_ms"][i] * FS / 1000
            qt = clean.extra["qt_ms"][i] * FS / 1000
            st = x[not_avr, int(round(on + qrs + 0.04 * FS))]  # ST level at J + 40 ms
            initial = x[not_avr, on + 1:on + int(0.03 * FS) + 1]  # first 30 ms of the QRS
            q_depth = np.where((initial < 0).all(1), -initial.min(1), 0.0)
            t_wave = x[not_avr, int(on + qt - 0.5 * (qt - qrs)):int(on + qt)].mean(1)
            mi_sign.append((st >= 0.1).sum() >= 2 or (q_depth >= 0.1).sum() >= 2)
            sttc_sign.append((st <= -0.05).sum() >= 2 or (t_wave < -0.05).sum() >= 2)
        return np.mean(mi_sign), np.mean(sttc_sign)

    norm_mi, norm_sttc = signs(_single(clean, "NORM"))
    mi_mi, _ = signs(_single(clean, "MI"))
    _, sttc_sttc = signs(_single(clean, "STTC"))
    assert mi_mi >= 0.75 and norm_mi <= 0.15  # Q waves and/or ST elevation in >= 2 leads
    assert sttc_sttc >= 0.6 and norm_sttc <= 0.1  # ST depression and/or T inversion


def test_class_counts_and_multi_label_rule(noisy):
    labels = noisy.labels
    per_record = labels.sum(1)
    assert ((per_record == 1) | (per_record == 2)).all()
    norm = labels[:, 0] > 0
    assert (per_record[norm] == 1).all()  # NORM is never combined
    abnormal = ~norm
    assert (per_record[abnormal] == 2).sum() == round(0.1 * abnormal.sum())
    assert norm.sum() == round(PRIMARY_SHARES[0] * 1200)
    counts = labels.sum(0)
    for k in range(1, 5):  # each abnormal class: its primary share plus some second labels
        assert PRIMARY_SHARES[k] * 1200 - 1 <= counts[k] <= PRIMARY_SHARES[k] * 1200 + 0.1 * 720
    def n_multi(fraction):
        return int((SyntheticSource(n_records=200, seconds=3.0, sampling_rate=50.0,
                                    multi_label_fraction=fraction).load().labels.sum(1) == 2).sum())

    assert n_multi(0.0) == 0 and n_multi(1.0) == 120


def test_splits_follow_fractions_and_classes(noisy):
    splits = noisy.splits
    assert set(np.unique(splits)) == {"train", "val", "test"}
    assert (splits == "test").sum() == 180 and abs((splits == "val").sum() - 180) <= 1
    for k in range(5):
        members = noisy.labels[:, k] > 0
        share = (splits[members] == "test").mean()
        assert abs(share - 0.15) < 0.03, CLASS_NAMES[k]
    other = SyntheticSource(n_records=100, seconds=3.0, sampling_rate=50.0, val_fraction=0.0,
                            test_fraction=0.3).load().splits
    assert (other == "test").sum() == 30 and (other == "val").sum() == 0


def test_logistic_regression_on_lead_statistics_is_good_but_not_perfect(noisy):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    # simple statistics of the 8 independent leads over the first 6 s, baseline removed
    x = noisy.signals[:, [LEAD[name] for name in ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")],
                      :int(6 * FS)]
    x = x - ndimage.uniform_filter1d(x, int(0.6 * FS), axis=-1, mode="nearest")
    centred = x - x.mean(-1, keepdims=True)
    sd = np.sqrt((centred * centred).mean(-1)) + 1e-6
    z = centred / sd[..., None]
    z2 = z * z
    feats = np.concatenate([sd, x.max(-1), x.min(-1), np.abs(np.diff(x, axis=-1)).mean(-1),
                            (z2 * z).mean(-1), (z2 * z2).mean(-1)], axis=1)
    train, test = noisy.splits == "train", noisy.splits == "test"
    scaler = StandardScaler().fit(feats[train])
    aucs = []
    with threadpool_limits(1):
        for k in range(5):
            clf = LogisticRegression(max_iter=3000).fit(scaler.transform(feats[train]),
                                                        noisy.labels[train, k])
            score = clf.predict_proba(scaler.transform(feats[test]))[:, 1]
            aucs.append(roc_auc_score(noisy.labels[test, k], score))
    assert 0.8 < np.mean(aucs) < 0.995, aucs  # a clear signal, yet a realistic task
    assert min(aucs) > 0.7, aucs


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("key, value", [
    ("n_records", 0), ("n_records", -3), ("n_records", 2.5), ("n_records", True),
    ("sampling_rate", 0.0), ("sampling_rate", -250.0), ("sampling_rate", 20.0),
    ("sampling_rate", "500"), ("sampling_rate", math.nan),
    ("seconds", 0.0), ("seconds", 0.5), ("seconds", math.inf),
    ("seed", -1), ("seed", 1.5),
    ("val_fraction", -0.1), ("val_fraction", 1.0), ("test_fraction", 1.2),
    ("noise", -0.5), ("multi_label_fraction", 1.5), ("multi_label_fraction", -0.1),
])
def test_bad_options_raise_one_config_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        SyntheticSource(**{key: value})


def test_fractions_must_leave_training_records():
    with pytest.raises(ConfigError, match="val_fraction.*test_fraction"):
        SyntheticSource(val_fraction=0.5, test_fraction=0.5)
