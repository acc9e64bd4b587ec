"""Hybrid probe: clinical preprocessing with missing values, fusion head, end-to-end evaluation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from ssl4ecg.clinical import EXTRA_PREFIX, FEATURE_NAMES, attach_features, extract_features
from ssl4ecg.data.synthetic import SyntheticSource
from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import Encoder, EvalContext
from ssl4ecg.registry import get_registry
from ssl4ecg_hybrid import ClinicalPreprocessor, FusionHead, HybridProbe


class RandomConv(Encoder):
    """A fixed random convolutional encoder: a weak embedding the clinical features must improve."""

    def __init__(self, spec, dim: int = 32) -> None:
        super().__init__()
        self.spec, self.embed_dim = spec, dim
        gen = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Conv1d(spec.n_leads, dim, 7, stride=5, padding=3), nn.GELU(),
                                 nn.Conv1d(dim, dim, 5, stride=4, padding=2))
        for p in self.net.parameters():
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.2)

    def tokens(self, x, leads=None):
        return self.net(x).transpose(1, 2)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """300 synthetic records (100 Hz) with their clinical features attached (computed once)."""
    rs = SyntheticSource(n_records=300, sampling_rate=100.0, seed=3).load()
    return attach_features(rs, cache_dir=tmp_path_factory.mktemp("clinical"))


def _context() -> EvalContext:
    return EvalContext(device=torch.device("cpu"), seed=0, out_dir=None, batch_size=64)


def test_preprocessor_imputes_indicates_and_expands_angles():
    names = ["heart_rate", "qrs_axis_deg", "pr_ms", "cornell"]
    train = np.array([
        [60.0, 0.0, 150.0, np.nan],
        [80.0, 90.0, np.nan, np.nan],
        [70.0, 180.0, 170.0, np.nan],
        [90.0, -90.0, 160.0, np.nan],
    ])
    pre = ClinicalPreprocessor.fit(train, names)
    # cornell never measured on train: dropped; pr_ms can be missing: indicator column
    assert pre.output_names() == ["heart_rate", "qrs_axis_sin", "qrs_axis_cos", "pr_ms", "pr_ms_missing"]
    test = np.array([[np.nan, 90.0, np.nan, 1.0], [75.0, np.nan, 160.0, np.nan]])
    out = pre.transform(test, names)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    hr_median, pr_median = 75.0, 160.0
    col = pre.output_names()
    # a missing value becomes the train median, i.e. exactly 0 after robust centring
    assert out[0, col.index("heart_rate")] == pytest.approx((hr_median - hr_median) / pre.scales[0])
    assert out[0, col.index("pr_ms_missing")] == 1.0 and out[1, col.index("pr_ms_missing")] == 0.0
    assert out[1, col.index("pr_ms")] == pytest.approx((160.0 - pr_median) / pre.scales[3])
    # the angle is encoded without its +-180 degree wrap: sin(90) = 1 -> above the train median
    assert out[0, col.index("qrs_axis_sin")] > 0


def test_preprocessor_clips_outliers():
    names = ["qt_ms"]
    pre = ClinicalPreprocessor.fit(np.array([[400.0], [410.0], [390.0], [405.0]]), names)
    out = pre.transform(np.array([[5000.0]]), names)
    assert out[0, 0] == pytest.approx(5.0)


@pytest.mark.parametrize("fusion", ["gated", "concat"])
def test_fusion_head_shapes_and_single_branches(fusion):
    torch.manual_seed(0)
    e, c = torch.randn(4, 10), torch.randn(4, 6)
    assert FusionHead(10, 6, 3, hidden=8, fusion=fusion)(e, c).shape == (4, 3)
    assert FusionHead(10, 0, 3, hidden=8, fusion=fusion)(e, None).shape == (4, 3)
    assert FusionHead(0, 6, 3, hidden=8, fusion=fusion)(None, c).shape == (4, 3)
    with pytest.raises(ValueError):
        FusionHead(0, 0, 3)


def test_gated_fusion_is_a_convex_mix_of_the_branches():
    head = FusionHead(4, 4, 2, hidden=3, fusion="gated")
    e, c = torch.randn(5, 4), torch.randn(5, 4)
    he, hc = head.embed(e), head.clinical(c)
    g = torch.sigmoid(head.gate(torch.cat([he, hc], dim=1)))
    mixed = g * he + (1 - g) * hc
    lo, hi = torch.minimum(he, hc), torch.maximum(he, hc)
    assert torch.all(mixed >= lo - 1e-6) and torch.all(mixed <= hi + 1e-6)


def test_clinical_features_improve_a_weak_embedding(records):
    probe = HybridProbe(epochs=20, bootstrap=0)
    out = probe.evaluate(RandomConv(records.spec), records, _context())
    assert 0.0 <= out["auc_macro"] <= 1.0 and 0.0 <= out["f1_macro"] <= 1.0
    assert set(out["auc_per_class"]) == set(records.class_names)
    assert set(out["f1_per_class"]) == set(records.class_names)
    emb_only = out["ablation"]["embedding_only"]["auc_macro"]
    clin_only = out["ablation"]["clinical_only"]["auc_macro"]
    assert out["auc_macro"] > emb_only + 0.05, (out["auc_macro"], emb_only)
    assert clin_only > emb_only
    proto = out["protocol"]
    assert proto["evaluator"] == "hybrid_probe" and proto["features"] == list(FEATURE_NAMES)
    assert proto["split_sizes"]["test"] == int((records.splits == "test").sum())
    assert 1 <= out["epoch"] <= 20


def test_nan_features_are_handled(records):
    """Half the heart rates and every PR interval missing: still trains, indicators present."""
    extra = dict(records.extra)
    hr = extra[EXTRA_PREFIX + "heart_rate"].copy()
    hr[::2] = np.nan
    extra[EXTRA_PREFIX + "heart_rate"] = hr
    extra[EXTRA_PREFIX + "pr_ms"] = np.full(len(records), np.nan, np.float32)
    holes = replace(records, extra=extra)
    out = HybridProbe(epochs=5, bootstrap=0, ablation=False).evaluate(RandomConv(records.spec), holes, _context())
    assert np.isfinite(out["auc_macro"])
    assert "heart_rate_missing" in out["clinical_inputs"]
    assert "pr_ms" not in out["clinical_inputs"]  # never measured on train: dropped
    assert out["missing_rate"]["train"]["pr_ms"] == 1.0
    assert 0.4 < out["missing_rate"]["train"]["heart_rate"] < 0.6


def test_features_are_computed_once_and_cached(tmp_path, monkeypatch):
    rs = SyntheticSource(n_records=60, sampling_rate=100.0, seed=4, val_fraction=0.25, test_fraction=0.25).load()
    import ssl4ecg.clinical.features as cf

    calls = []
    real = cf.extract_features
    monkeypatch.setattr(cf, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    probe = HybridProbe(epochs=2, bootstrap=0, ablation=False, cache_dir=str(tmp_path))
    probe.evaluate(RandomConv(rs.spec), rs, _context())
    probe.evaluate(RandomConv(rs.spec), rs, _context())
    assert len(calls) == 1
    assert len(list(tmp_path.glob("*.npz"))) == 1


def test_feature_subset_and_option_checks(records):
    out = HybridProbe(epochs=3, bootstrap=0, ablation=False, features=("heart_rate", "qrs_ms")).evaluate(
        RandomConv(records.spec), records, _context())
    assert out["clinical_inputs"] == ["heart_rate", "qrs_ms"]  # both always measured here: no indicators
    with pytest.raises(ConfigError, match="unknown features"):
        HybridProbe(features=("heart_rate", "qrs"))
    with pytest.raises(ConfigError, match="fusion"):
        HybridProbe(fusion="sum")


def test_registered_and_deterministic(records):
    reg = get_registry()
    probe = reg.build("evaluator", "hybrid_probe", {"epochs": 3, "bootstrap": 0, "ablation": False}, "eval")
    a = probe.evaluate(RandomConv(records.spec), records, _context())
    b = probe.evaluate(RandomConv(records.spec), records, _context())
    assert a["auc_macro"] == b["auc_macro"]
    direct, _ = extract_features(records.subset(np.arange(3)))
    np.testing.assert_array_equal(
        direct, np.stack([records.extra[EXTRA_PREFIX + n][:3] for n in FEATURE_NAMES], axis=1))
