"""The DeepFake-ECG source: an unlimited, seeded, unlabelled 8-lead corpus."""

import numpy as np
import pytest

from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import JEPA_LEADS

pytest.importorskip("deepfakeecg", reason="deepfake-ecg is not installed (pip install deepfake-ecg)")

from ssl4ecg.data.sources.deepfake import DeepfakeSource  # noqa: E402


def test_records_are_8_lead_500hz_millivolts_and_seeded():
    a = DeepfakeSource(n_records=5, seed=3, batch_size=2, val_fraction=0.2).load()
    assert a.signals.shape == (5, 8, 5000) and a.signals.dtype == np.float32
    assert a.leads == JEPA_LEADS and a.sampling_rate == 500.0
    assert not a.is_labelled
    assert list(a.splits) == ["train"] * 4 + ["val"]
    # microvolt output of the package converted to millivolts: ECG-sized amplitudes
    assert 0.02 < float(a.signals.std()) < 2.0 and float(np.abs(a.signals).max()) < 20.0
    b = DeepfakeSource(n_records=5, seed=3, batch_size=5).load()
    np.testing.assert_allclose(a.signals, b.signals, atol=1e-4)  # batch size does not change the records
    c = DeepfakeSource(n_records=5, seed=4).load()
    assert not np.allclose(a.signals, c.signals)
    assert len(set(a.record_ids) & set(c.record_ids)) == 0


def test_bad_options_name_the_key():
    with pytest.raises(ConfigError, match="n_records"):
        DeepfakeSource(n_records=0)
    with pytest.raises(ConfigError, match="val_fraction"):
        DeepfakeSource(val_fraction=1.5)
