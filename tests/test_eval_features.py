"""extract_features: batching, eval mode and its restoration, no grad, lead selection, bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ssl4ecg.data.records import RecordSet
from ssl4ecg.errors import ConfigError
from ssl4ecg.eval.features import extract_features
from ssl4ecg.interfaces import EvalContext, Encoder, SignalSpec

LEADS = ("I", "II", "V1")


class Recorder(Encoder):
    """Linear per-lead encoder that records the mode, grad state and leads of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.spec = SignalSpec(LEADS, 100.0, 20)
        self.embed_dim = 4
        self.proj = nn.Linear(20, 4)
        self.drop = nn.Dropout(0.5)
        self.calls: list[tuple[bool, bool, tuple | None, int]] = []

    def tokens(self, x, leads=None):
        self.lead_indices(leads)
        self.calls.append((self.training, torch.is_grad_enabled(), None if leads is None else tuple(leads), x.shape[1]))
        return self.drop(self.proj(x))


def make_records(n=10):
    rng = np.random.default_rng(0)
    return RecordSet(signals=rng.normal(size=(n, 3, 20)).astype(np.float32), leads=LEADS,
                     sampling_rate=100.0, record_ids=np.arange(n))


def ctx(**kw):
    return EvalContext(device=torch.device("cpu"), seed=0, out_dir=None, **kw)


def test_batched_features_equal_one_pass_in_eval_mode():
    enc, rec = Recorder(), make_records(10)
    feats = extract_features(enc, rec, ctx(batch_size=3))
    assert feats.shape == (10, 4) and feats.dtype == np.float32
    assert len(enc.calls) == 4  # 3 + 3 + 3 + 1
    assert all(not training and not grad for training, grad, _, _ in enc.calls)
    enc.eval()
    with torch.no_grad():
        expected = enc.embed(torch.from_numpy(rec.signals)).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-6, atol=1e-6)


def test_training_flags_restored_per_module():
    enc = Recorder()
    enc.train()
    enc.drop.eval()  # a deliberately mixed state must survive
    extract_features(enc, make_records(4), ctx())
    assert enc.training and enc.proj.training and not enc.drop.training


def test_lead_selection_feeds_named_rows():
    enc, rec = Recorder(), make_records(5)
    feats = extract_features(enc, rec, ctx(), leads=["V1", "I"])
    assert enc.calls[-1][2:] == (("V1", "I"), 2)
    enc.eval()
    with torch.no_grad():
        expected = enc.embed(torch.from_numpy(rec.signals[:, [2, 0]])).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-6, atol=1e-6)
    # the encoder's own leads in its own order are passed as leads=None
    extract_features(enc, rec, ctx())
    assert enc.calls[-1][2] is None


def test_unknown_lead_is_a_config_error():
    with pytest.raises(ConfigError, match="aVR"):
        extract_features(Recorder(), make_records(3), ctx(), leads=["aVR"])


def test_bf16_autocast_path_close_to_fp32():
    enc, rec = Recorder(), make_records(6)
    a = extract_features(enc, rec, ctx())
    b = extract_features(enc, rec, ctx(precision="bf16"))
    assert b.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=0.05)
    assert not np.array_equal(a, b)  # bf16 really ran


def test_a_record_with_nan_values_is_named_instead_of_scoring_nan():
    """64 bytes of 0xFF in a cache read as NaN: evaluation must stop, not report auc nan."""
    from ssl4ecg.errors import DataError

    records = make_records()
    records.signals[3, 0, 2:18] = np.frombuffer(b"\xff" * 64, dtype=np.float32)  # NaN bit patterns
    with pytest.raises(DataError, match=r"1 record\(s\) hold NaN/inf signal values \(e.g. 3\).*--verify"):
        extract_features(Recorder(), records, ctx())


def test_an_encoder_giving_non_finite_features_is_named():
    from ssl4ecg.errors import DataError

    encoder = Recorder()
    with torch.no_grad():
        for p in encoder.parameters():
            p.fill_(float("inf"))
    with pytest.raises(DataError, match="the encoder gives non-finite features for 10 record"):
        extract_features(encoder, make_records(), ctx())
