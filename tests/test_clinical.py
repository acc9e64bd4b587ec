"""Clinical feature extractor: accuracy on synthetic ground truth, NaN policy, caching, real data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ssl4ecg.clinical import (
    EXTRA_PREFIX,
    FEATURE_NAMES,
    attach_features,
    content_key,
    detect_r_peaks,
    extract_features,
    features_for,
    measure_record,
    record_features,
)
from ssl4ecg.clinical.compare import mean_heart_rate, xqrs_heart_rate
from ssl4ecg.data.records import RecordSet
from ssl4ecg.data.synthetic import SyntheticSource
from ssl4ecg.interfaces import STANDARD_LEADS

COL = {name: i for i, name in enumerate(FEATURE_NAMES)}


@pytest.fixture(scope="module")
def synthetic() -> RecordSet:
    """120 default synthetic records (500 Hz, default noise) with ground-truth intervals."""
    return SyntheticSource(n_records=120, sampling_rate=500.0, seed=11).load()


@pytest.fixture(scope="module")
def synthetic_features(synthetic) -> np.ndarray:
    feats, names = extract_features(synthetic)
    assert names == list(FEATURE_NAMES)
    return feats


def _share_within(pred: np.ndarray, truth: np.ndarray, tol: float) -> float:
    """Share of records within ``tol`` of the truth; NaN counts as a miss."""
    return float(np.mean(np.abs(np.nan_to_num(pred - truth, nan=np.inf)) <= tol))


def _pulse_train(fs: float, seconds: float, hr: float, qrs_ms: float, amplitude: float = 1.0) -> np.ndarray:
    """Raised-cosine 'QRS' pulses of width ``qrs_ms`` at ``hr`` bpm (one lead)."""
    t = np.arange(int(seconds * fs)) / fs
    x = np.zeros_like(t)
    half = qrs_ms / 2000.0
    for c in np.arange(0.4, seconds - 0.3, 60.0 / hr):
        d = (t - c) / half
        x += amplitude * np.where(np.abs(d) < 1, 0.5 + 0.5 * np.cos(np.pi * d), 0.0)
    return x


# ----------------------------------------------------------------------------- accuracy

def test_heart_rate_within_2_bpm_on_synthetic(synthetic, synthetic_features):
    share = _share_within(synthetic_features[:, COL["heart_rate"]], synthetic.extra["heart_rate"], 2.0)
    assert share >= 0.95, f"heart rate within 2 bpm for only {share:.1%} of records"


def test_qrs_duration_within_10_ms_on_synthetic(synthetic, synthetic_features):
    share = _share_within(synthetic_features[:, COL["qrs_ms"]], synthetic.extra["qrs_ms"], 10.0)
    assert share >= 0.95, f"QRS duration within 10 ms for only {share:.1%} of records"


def test_pr_and_qt_close_to_truth_on_synthetic(synthetic, synthetic_features):
    pr = _share_within(synthetic_features[:, COL["pr_ms"]], synthetic.extra["pr_ms"], 20.0)
    qt = _share_within(synthetic_features[:, COL["qt_ms"]], synthetic.extra["qt_ms"], 40.0)
    assert pr >= 0.85, f"PR within 20 ms for only {pr:.1%}"
    assert qt >= 0.85, f"QT within 40 ms for only {qt:.1%}"


def test_qtc_formulas_follow_from_qt_and_rr(synthetic_features):
    f = synthetic_features
    ok = np.isfinite(f[:, COL["qt_ms"]])
    rr = 60.0 / f[ok, COL["heart_rate"]]
    qt = f[ok, COL["qt_ms"]] / 1000.0
    np.testing.assert_allclose(f[ok, COL["qtc_bazett_ms"]], 1000.0 * qt / np.sqrt(rr), rtol=1e-4)
    np.testing.assert_allclose(f[ok, COL["qtc_fridericia_ms"]], 1000.0 * qt / np.cbrt(rr), rtol=1e-4)


def test_conduction_disease_widens_and_hypertrophy_raises_voltage(synthetic, synthetic_features):
    """Class effects the measurements must see: CD -> wide QRS, HYP -> high Sokolow-Lyon voltage."""
    names = list(synthetic.class_names)
    y = synthetic.labels > 0.5
    norm_only = y[:, names.index("NORM")] & (y.sum(1) == 1)
    cd = y[:, names.index("CD")]
    hyp = y[:, names.index("HYP")]
    qrs = synthetic_features[:, COL["qrs_ms"]]
    sok = synthetic_features[:, COL["sokolow_lyon"]]
    assert np.nanmedian(qrs[cd]) > np.nanmedian(qrs[norm_only]) + 25
    assert np.nanmedian(sok[hyp]) > 1.3 * np.nanmedian(sok[norm_only])


def test_heart_rate_and_qrs_of_a_known_pulse_train():
    fs = 250.0
    lead = _pulse_train(fs, 10.0, hr=75.0, qrs_ms=100.0)
    sig = np.stack([lead, 0.6 * lead, -0.4 * lead])
    f = measure_record(sig, ["I", "II", "V1"], fs)
    assert f["heart_rate"] == pytest.approx(75.0, abs=0.5)
    assert f["qrs_ms"] == pytest.approx(100.0, abs=10.0)
    assert f["sdnn_ms"] == pytest.approx(0.0, abs=5.0)  # perfectly regular rhythm


def test_axis_from_leads_i_and_avf():
    """A pure frontal dipole: axis from I and aVF, or from I and II (aVF = II - I/2)."""
    fs = 500.0
    base = _pulse_train(fs, 10.0, hr=60.0, qrs_ms=90.0)
    for degrees in (60.0, -20.0, 120.0):
        angle = math.radians(degrees)
        lead_i = math.cos(angle) * base
        lead_ii = math.cos(angle - math.radians(60.0)) * base
        lead_avf = lead_ii - 0.5 * lead_i  # Goldberger
        f = measure_record(np.stack([lead_i, lead_ii, lead_avf]), ["I", "II", "aVF"], fs)
        assert f["qrs_axis_deg"] == pytest.approx(degrees, abs=3.0)
        g = measure_record(np.stack([lead_i, lead_ii]), ["I", "II"], fs)
        assert g["qrs_axis_deg"] == pytest.approx(degrees, abs=3.0)


# ----------------------------------------------------------------------------- NaN policy

def test_unmeasurable_features_are_nan_not_zero():
    fs = 250.0
    flat = np.zeros((12, 2500))
    f = record_features(flat, STANDARD_LEADS, fs)
    assert np.isnan(f).all()
    noise = np.random.default_rng(0).normal(size=(12, 2500)) * 1e-3
    g = record_features(noise, STANDARD_LEADS, fs)
    assert not np.any(g == 0.0)


def test_missing_leads_give_nan_for_their_features_only():
    fs = 250.0
    lead = _pulse_train(fs, 10.0, hr=70.0, qrs_ms=90.0)
    f = measure_record(np.stack([lead, 0.8 * lead]), ["II", "V5"], fs)
    assert np.isfinite(f["heart_rate"]) and np.isfinite(f["qrs_ms"])
    for name in ("st60_V1", "st60_aVL", "cornell", "sokolow_lyon"):
        assert math.isnan(f[name]), name  # V1 / aVL / V3 absent
    assert np.isfinite(f["st60_II"]) and np.isfinite(f["st60_V5"])


def test_noisy_lead_is_dropped_and_beats_still_found(synthetic):
    rng = np.random.default_rng(1)
    x = np.array(synthetic.signals[0], dtype=np.float64)
    x[3] = rng.normal(scale=5 * x.std(), size=x.shape[1])  # aVR replaced by large noise
    x[7] = np.nan  # V2 disconnected
    det = detect_r_peaks(x, synthetic.sampling_rate)
    assert not det.good_leads[3] and not det.good_leads[7]
    f = record_features(x, synthetic.leads, synthetic.sampling_rate)
    assert f[COL["heart_rate"]] == pytest.approx(float(synthetic.extra["heart_rate"][0]), abs=2.0)
    assert np.isnan(f[COL["st60_aVR"]]) and np.isnan(f[COL["st60_V2"]])


def test_too_short_record_is_all_nan():
    f = record_features(np.ones((12, 50)), STANDARD_LEADS, 100.0)
    assert np.isnan(f).all()


# ----------------------------------------------------------------------------- batch and cache

def test_workers_do_not_change_the_result(synthetic):
    part = synthetic.subset(np.arange(20))
    one, _ = extract_features(part, workers=1)
    two, _ = extract_features(part, workers=2, chunk_size=7)
    np.testing.assert_array_equal(one, two)
    assert one.dtype == np.float32 and one.shape == (20, len(FEATURE_NAMES))


def test_cache_is_written_read_and_keyed_by_content(synthetic, tmp_path, monkeypatch):
    part = synthetic.subset(np.arange(6))
    feats, _ = features_for(part, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and files[0].stem == content_key(part)

    import ssl4ecg.clinical.features as cf

    def boom(*args, **kwargs):  # a second call must come from the cache
        raise AssertionError("features recomputed despite the cache")

    monkeypatch.setattr(cf, "extract_features", boom)
    again, _ = features_for(part, cache_dir=tmp_path)
    np.testing.assert_array_equal(feats, again)
    changed = part.subset(np.arange(6))
    changed.signals = np.array(changed.signals)
    changed.signals[0, 0, :10] += 1.0
    assert content_key(changed) != content_key(part)
    with pytest.raises(AssertionError, match="recomputed"):
        features_for(changed, cache_dir=tmp_path)


def test_attached_features_follow_subsets(synthetic, tmp_path):
    part = synthetic.subset(np.arange(5))
    withf = attach_features(part, cache_dir=tmp_path)
    assert all(EXTRA_PREFIX + n in withf.extra for n in FEATURE_NAMES)
    sub = withf.subset([4, 1])
    feats, _ = features_for(sub, use_cache=False)
    direct, _ = extract_features(part)
    np.testing.assert_array_equal(feats, direct[[4, 1]])


def test_clinical_targets_feed_the_feature_regression_evaluator(synthetic, tmp_path, monkeypatch):
    from ssl4ecg.clinical import clinical_targets
    from ssl4ecg.eval.feature_regression import resolve_callable

    monkeypatch.setenv("SSL4ECG_CACHE_DIR", str(tmp_path))
    fn = resolve_callable("ssl4ecg.clinical:clinical_targets", "target_fn")
    assert fn is clinical_targets
    part = synthetic.subset(np.arange(4))
    targets = fn(part)
    assert set(targets) == set(FEATURE_NAMES)
    direct, _ = extract_features(part)
    np.testing.assert_array_equal(targets["qrs_ms"], direct[:, COL["qrs_ms"]].astype(np.float64))
    assert list((tmp_path / "clinical").glob("*.npz"))


# ----------------------------------------------------------------------------- real data

@pytest.mark.slow
def test_heart_rate_agrees_with_xqrs_on_ptbxl_mini(shared_data):
    """>= 95 % of 300 real 100 Hz records within 5 bpm of XQRS (lead II, resampled to 250 Hz)."""
    pytest.importorskip("wfdb")
    from ssl4ecg.clinical.compare import load_ptbxl_records

    root = shared_data / "ptbxl-mini"
    if not (root / "ptbxl_database.csv").is_file():
        pytest.skip("ptbxl-mini not found in the shared data folder")
    x, leads, fs = load_ptbxl_records(root, n=300)
    ours = np.array([mean_heart_rate(detect_r_peaks(r, fs).peaks, fs) for r in x])
    ref = np.array([xqrs_heart_rate(r[leads.index("II")], fs) for r in x])
    share = _share_within(ours, ref, 5.0)
    assert share >= 0.95, f"only {share:.1%} of records agree with XQRS within 5 bpm"
    assert np.isfinite(ours).all()
