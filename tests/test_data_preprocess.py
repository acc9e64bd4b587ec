"""Preprocessing: resampling, leads, band-pass, normalisation, cropping, on real and known signals."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import resample_poly

from ssl4ecg.data import preprocess as P
from ssl4ecg.data.sources.wfdb_io import read_record
from ssl4ecg.errors import ConfigError, DataError
from ssl4ecg.interfaces import JEPA_LEADS, STANDARD_LEADS


def _sine(freq: float, fs: float, seconds: float, leads: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * fs)) / fs
    return np.tile(np.sin(2 * np.pi * freq * t), (leads, 1)).astype(np.float32)


@pytest.mark.parametrize("fs_in,fs_out", [(100, 250), (500, 250), (400, 250), (250, 100), (360, 250), (257, 250)])
def test_resample_matches_scipy_resample_poly(fs_in, fs_out):
    x = np.random.default_rng(0).standard_normal((3, 1234))
    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    expected = resample_poly(x, ratio.numerator, ratio.denominator, axis=-1)
    got = P.resample(x, fs_in, fs_out)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_resample_keeps_a_sine_and_its_frequency():
    x = _sine(5.0, 500, 10)
    y = P.resample(x, 500, 250)
    assert y.shape == (1, 2500)
    np.testing.assert_allclose(y[0, 100:-100], _sine(5.0, 250, 10)[0, 100:-100], atol=1e-3)
    assert P.resample(x, 500, 500) is not None and P.resample(x, 500, 500).shape == x.shape


def test_leads_selected_by_name_in_order_and_aliases():
    x = np.arange(12)[:, None] * np.ones((12, 5), dtype=np.float32)
    names = ["DI", "DII", "DIII", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    out = P.select_leads(x, names, ("V6", "I", "aVF"))
    assert out[:, 0].tolist() == [11, 0, 5]


def test_derived_limb_leads_match_recorded_ones_on_a_real_record(shared_data):
    header, signal = read_record(shared_data / "cinc-sample" / "ptbxl-hr" / "HR06000")
    assert header.lead_names == STANDARD_LEADS
    two = signal[[0, 1]]  # only I and II
    derived = P.select_leads(two, ("I", "II"), ("III", "aVR", "aVL", "aVF"))
    # the recorded limb leads were computed by the device from I and II (quantised to 1 uV)
    np.testing.assert_allclose(derived, signal[2:6], atol=2.5e-3)


def test_missing_lead_error_names_the_lead_and_what_the_record_has():
    x = np.zeros((2, 100), dtype=np.float32)
    with pytest.raises(DataError, match=r"V1 missing and not derivable; the record has I, II"):
        P.select_leads(x, ("I", "II"), ("I", "V1"))
    with pytest.raises(DataError, match="derive_leads is off"):
        P.select_leads(x, ("I", "II"), ("III",), derive=False)


def test_bandpass_removes_out_of_band_and_keeps_phase():
    fs = 250.0
    keep = _sine(10.0, fs, 20)
    drift = _sine(0.1, fs, 20) * 3
    hum = _sine(60.0, fs, 20)
    out = P.bandpass(keep + drift + hum, fs, 0.67, 40.0)
    core = slice(500, -500)
    np.testing.assert_allclose(out[0, core], keep[0, core], atol=0.05)  # zero phase: no lag
    lowpass = P.bandpass(keep + hum, fs, 0.0, 40.0)
    np.testing.assert_allclose(lowpass[0, core], keep[0, core], atol=0.05)


def test_bandpass_option_checked_against_nyquist():
    assert P.check_bandpass([], 100) == ()
    with pytest.raises(ConfigError, match="half the sampling rate"):
        P.check_bandpass([0.5, 60.0], 100.0)
    with pytest.raises(ConfigError, match=r"\[low, high\]"):
        P.check_bandpass([40.0, 0.5], 250.0)


def test_normalisation_modes():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 1000)) * [[1.0], [5.0], [0.1]] + [[2.0], [-3.0], [7.0]]).astype(np.float32)
    lead = P.normalize_record(x, "lead")
    np.testing.assert_allclose(lead.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(lead.std(axis=1), 1, atol=1e-4)
    rec = P.normalize_record(x, "record")
    assert abs(rec.mean()) < 1e-5 and abs(rec.std() - 1) < 1e-4
    assert rec[1].std() > rec[2].std() * 10  # relative amplitudes kept
    flat = P.normalize_record(np.full((2, 50), 3.0, dtype=np.float32), "lead")
    assert np.all(flat == 0)  # a flat lead stays flat instead of exploding
    assert P.normalize_record(x, "none") is x


def test_dataset_stats_use_only_the_given_rows():
    signals = np.zeros((4, 2, 10), dtype=np.float32)
    signals[:2, 0] = 1.0
    signals[:2, 1] = np.arange(10)
    signals[2:] = 100.0  # not in the training rows
    mean, std = P.dataset_stats(signals, np.array([0, 1]))
    np.testing.assert_allclose(mean, [1.0, 4.5])
    np.testing.assert_allclose(std, [1.0, np.arange(10).std()])  # flat lead: std 1 (no division blow-up)
    out = P.apply_dataset_norm(signals, mean, std)
    np.testing.assert_allclose(out[:2, 1].mean(), 0, atol=1e-6)


def test_crop_offsets_and_short_records():
    assert P.crop_offset(1000, 400, "start") == 0
    assert P.crop_offset(1000, 400, "center") == 300
    a = P.crop_offset(1000, 400, "random", "rec-1", "train")
    assert a == P.crop_offset(1000, 400, "random", "rec-1", "train")
    offsets = {P.crop_offset(1000, 400, "random", f"rec-{i}", "train") for i in range(20)}
    assert len(offsets) > 5 and all(0 <= o <= 600 for o in offsets)
    assert P.crop_offset(1000, 400, "random", "rec-1", "test") == 300  # evaluation is never random
    short = np.ones((2, 995), dtype=np.float32)
    assert P.fit_length(short, 1000).shape == (2, 1000)  # 0.5 % short: padded
    with pytest.raises(DataError, match=r"2.00 s long, shorter than the 4.00 s asked"):
        P.fit_length(np.ones((2, 500)), 1000, fs=250.0)
    padded = P.fit_length(np.ones((2, 500), dtype=np.float32), 1000, pad_short=True)
    assert padded[:, :500].min() == 1 and padded[:, 500:].max() == 0


def test_multi_crop_evenly_spaced():
    x = np.arange(10, dtype=np.float32)[None, None, :].repeat(2, 0)
    crops = P.multi_crop(x, 4, 3)
    assert crops.shape == (2, 3, 1, 4)
    assert crops[0, :, 0, 0].tolist() == [0, 3, 6]
    assert crops[0, -1, 0, -1] == 9
    with pytest.raises(ConfigError):
        P.multi_crop(x, 20, 2)


@settings(max_examples=40, deadline=None)
@given(t=st.integers(50, 600), n=st.integers(1, 50), k=st.integers(1, 6))
def test_multi_crop_property_windows_inside_and_ordered(t, n, k):
    x = np.arange(t, dtype=np.float32)[None, :]
    crops = P.multi_crop(x, n, k)
    starts = crops[:, 0, 0]
    assert crops.shape == (k, 1, n)
    assert np.all(np.diff(starts) >= 0) and starts.min() >= 0 and starts.max() + n <= t
    assert np.all(crops[:, 0, -1] - crops[:, 0, 0] == n - 1)  # contiguous windows


def test_process_record_pipeline_on_a_real_500hz_record(shared_data):
    header, signal = read_record(shared_data / "cinc-sample" / "ptbxl-hr" / "HR06001")
    pp = P.Preprocessing(sampling_rate=250.0, seconds=8.0, leads=JEPA_LEADS, bandpass=(0.67, 40.0),
                         normalize="lead", crop="center")
    out = P.process_record(signal, header.lead_names, header.fs, pp)
    assert out.shape == (8, 2000) and out.dtype == np.float32
    np.testing.assert_allclose(out.mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=1), 1, atol=1e-3)
    bad = signal.copy()
    bad[3, 10] = np.nan  # NaN in aVR, a lead not asked for: still fine
    P.process_record(bad, header.lead_names, header.fs, pp)
    bad[0, 10] = np.nan
    with pytest.raises(DataError, match="1 NaN or infinite"):
        P.process_record(bad, header.lead_names, header.fs, pp)


def test_preprocessing_options_are_checked():
    with pytest.raises(ConfigError, match="Did you mean 'record'"):
        P.Preprocessing(normalize="recrod")
    with pytest.raises(ConfigError, match="Did you mean 'center'"):
        P.Preprocessing(crop="centre")
    with pytest.raises(ConfigError, match="'V7' is not one of the 12 standard leads"):
        P.Preprocessing(leads=("I", "V7"))
    with pytest.raises(ConfigError, match="listed twice"):
        P.Preprocessing(leads=("I", "DI"))
    assert P.Preprocessing(leads=("avr", "d2")).leads == ("aVR", "II")
    assert P.Preprocessing(seconds=9, sampling_rate=250).n_samples == 2250
