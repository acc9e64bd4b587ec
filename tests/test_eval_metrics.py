"""Metrics against hand-computed values and scikit-learn; bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from ssl4ecg.eval.metrics import (
    auc_macro,
    bootstrap_ci,
    f1_macro,
    mae,
    ovr_auc_macro,
    per_class_auc,
    per_class_auc_array,
    score_classification,
)


def test_auc_hand_computed_with_ties():
    # positives scored 0.9, 0.5; negatives 0.5, 0.1 -> pairs: (0.9>0.5) 1, (0.9>0.1) 1,
    # (0.5=0.5) 0.5, (0.5>0.1) 1  => 3.5 / 4
    y = np.array([1, 1, 0, 0])
    s = np.array([0.9, 0.5, 0.5, 0.1])
    assert per_class_auc_array(y, s)[0] == pytest.approx(0.875)


def test_auc_matches_sklearn_per_class_and_macro():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 4)) < [0.5, 0.2, 0.1, 0.7]).astype(float)
    s = np.round(rng.random((300, 4)) + 0.4 * y, 2)  # rounding creates ties
    expected = [roc_auc_score(y[:, c], s[:, c]) for c in range(4)]
    np.testing.assert_allclose(per_class_auc_array(y, s), expected, rtol=1e-12)
    assert auc_macro(y, s) == pytest.approx(roc_auc_score(y, s, average="macro"))


def test_degenerate_class_excluded_and_reported():
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]], dtype=float)
    s = np.array([[0.8, 0.1, 0.3], [0.2, 0.4, 0.2], [0.6, 0.2, 0.9], [0.7, 0.3, 0.5]])
    scores, excluded = per_class_auc(y, s, ["a", "b", "c"])
    assert excluded == ["b", "c"]
    assert list(scores) == ["a"]
    assert scores["a"] == pytest.approx(roc_auc_score(y[:, 0], s[:, 0]))
    assert auc_macro(y, s) == pytest.approx(scores["a"])
    # a fixed class set that includes a degenerate class cannot be scored
    assert np.isnan(auc_macro(y, s, classes=np.array([0, 1])))
    out = score_classification(y, s, ["a", "b", "c"], n_resamples=0)
    assert out["classes_excluded"] == ["b", "c"]
    assert out["auc_macro"] == pytest.approx(scores["a"])
    assert "auc_macro_ci" not in out


def test_multiclass_ovr_auc_matches_sklearn():
    rng = np.random.default_rng(1)
    k = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[k]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = roc_auc_score(k, p, multi_class="ovr", average="macro")
    assert ovr_auc_macro(k, p) == pytest.approx(expected)
    assert ovr_auc_macro(np.eye(3)[k], p) == pytest.approx(expected)


def test_f1_macro_multilabel_and_multiclass_match_sklearn():
    rng = np.random.default_rng(2)
    y = (rng.random((150, 3)) < 0.4).astype(float)
    s = rng.random((150, 3)) * 0.6 + 0.4 * y
    expected = f1_score(y, s >= 0.5, average="macro", zero_division=0)
    assert f1_macro(y, s, threshold=0.5) == pytest.approx(expected)
    # hand-computed: one class, tp=1, fp=1, fn=1 -> 2/(2+1+1)
    assert f1_macro(np.array([1, 1, 0, 0]), np.array([0.9, 0.2, 0.7, 0.1])) == pytest.approx(0.5)
    k = rng.integers(0, 4, 150)
    p = rng.random((150, 4)) + 0.5 * np.eye(4)[k]
    expected = f1_score(k, p.argmax(1), average="macro", labels=[0, 1, 2, 3], zero_division=0)
    assert f1_macro(np.eye(4)[k], p, multi_label=False) == pytest.approx(expected)


def test_mae():
    assert mae([1.0, 2.0, 4.0], [2.0, 2.0, 1.0]) == pytest.approx(4.0 / 3.0)


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(3)
    y = (rng.random(400) < 0.3).astype(float)
    s = rng.random(400) + 0.5 * y
    est = auc_macro(y, s)
    lo, hi = bootstrap_ci(auc_macro, y, s, n_resamples=300, seed=7)
    assert lo < est < hi
    assert hi - lo < 0.2
    assert (lo, hi) == bootstrap_ci(auc_macro, y, s, n_resamples=300, seed=7)
    assert (lo, hi) != bootstrap_ci(auc_macro, y, s, n_resamples=300, seed=8)


def test_bootstrap_interval_matches_manual_percentiles():
    y = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    p = np.zeros(5)
    lo, hi = bootstrap_ci(mae, y, p, n_resamples=200, seed=0, alpha=0.1)
    rng = np.random.default_rng(0)
    vals = [np.mean(np.abs(y[i])) for i in (rng.integers(0, 5, 5) for _ in range(200))]
    assert lo == pytest.approx(np.percentile(vals, 5))
    assert hi == pytest.approx(np.percentile(vals, 95))


def test_bootstrap_redraws_unscorable_resamples():
    # one positive among 20: many resamples lose it; every kept resample must be finite
    y = np.zeros(20)
    y[3] = 1
    s = np.linspace(0, 1, 20)
    lo, hi = bootstrap_ci(auc_macro, y, s, n_resamples=100, seed=0)
    assert np.isfinite(lo) and np.isfinite(hi) and 0 <= lo <= hi <= 1


def test_score_classification_intervals_bracket_estimates():
    rng = np.random.default_rng(4)
    y = (rng.random((300, 3)) < 0.4).astype(float)
    s = 1 / (1 + np.exp(-(rng.normal(size=(300, 3)) + 2 * y - 1)))
    out = score_classification(y, s, ["x", "y", "z"], n_resamples=200, seed=1)
    assert out["auc_macro"] == pytest.approx(roc_auc_score(y, s, average="macro"))
    assert out["f1_macro"] == pytest.approx(f1_score(y, s >= 0.5, average="macro"))
    lo, hi = out["auc_macro_ci"]
    assert lo <= out["auc_macro"] <= hi
    lo, hi = out["f1_macro_ci"]
    assert lo <= out["f1_macro"] <= hi
    for c in "xyz":
        lo, hi = out["auc_per_class_ci"][c]
        assert lo <= out["auc_per_class"][c] <= hi
