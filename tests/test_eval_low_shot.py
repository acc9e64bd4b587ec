"""Low-shot subsets: stratified (multi-label aware), nested across fractions, seeded; evaluator output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl4ecg.errors import ConfigError
from ssl4ecg.eval.low_shot import LowShot, nested_stratified_subsets
from ssl4ecg.eval.testing import FlattenEncoder, synthetic_records
from ssl4ecg.interfaces import EvalContext
from ssl4ecg.registry import collect


@pytest.fixture(scope="module")
def labels():
    rng = np.random.default_rng(0)
    return (rng.random((3000, 5)) < [0.45, 0.25, 0.2, 0.1, 0.04]).astype(np.float32)


def test_subsets_are_stratified_per_class(labels):
    subsets = nested_stratified_subsets(labels, [0.01, 0.1, 0.3], seed=0)
    totals = labels.sum(0)
    for f, idx in subsets.items():
        assert len(idx) == round(f * len(labels)) and len(set(idx.tolist())) == len(idx)
        counts = labels[idx].sum(0)
        # every class within one record of its proportional share
        assert np.all(np.abs(counts - f * totals) <= 1.0 + 1e-9), (f, counts, f * totals)


def test_random_subsets_would_not_be_this_stratified(labels):
    # the check above is not trivially met: plain random 1 % subsets usually miss by more
    rng = np.random.default_rng(0)
    misses = [np.abs(labels[rng.choice(3000, 30, replace=False)].sum(0) - 0.01 * labels.sum(0)).max() > 1
              for _ in range(50)]
    assert np.mean(misses) > 0.5


def test_subsets_nested_and_seeded(labels):
    a = nested_stratified_subsets(labels, [0.01, 0.1, 0.3], seed=5)
    assert set(a[0.01]) <= set(a[0.1]) <= set(a[0.3])
    b = nested_stratified_subsets(labels, [0.3, 0.01], seed=5)
    np.testing.assert_array_equal(a[0.01], b[0.01])
    np.testing.assert_array_equal(a[0.3], b[0.3])
    c = nested_stratified_subsets(labels, [0.1], seed=6)
    assert set(c[0.1]) != set(a[0.1])


def test_multiclass_subsets_stratified():
    y = np.eye(4)[np.random.default_rng(1).integers(0, 4, 1000)]
    idx = nested_stratified_subsets(y, [0.05], seed=0)[0.05]
    assert np.all(np.abs(y[idx].sum(0) - 0.05 * y.sum(0)) <= 1.0)


def test_low_shot_evaluator_reports_mean_and_std_over_trials():
    rec = synthetic_records(n_per_split=(400, 100, 100), separation=4.0, seed=3)
    ev = LowShot(fractions=(0.1, 0.5), trials=3, lr=0.05)
    ctx = EvalContext(device=torch.device("cpu"), seed=0, out_dir=None)
    out = ev.evaluate(FlattenEncoder(rec.spec), rec, ctx)
    for f in ("0.1", "0.5"):
        trials = out[f"trials@{f}"]
        assert len(trials) == 3
        aucs = [t["auc_macro"] for t in trials]
        assert out[f"auc_macro@{f}"] == pytest.approx(np.mean(aucs))
        assert out[f"auc_macro@{f}_std"] == pytest.approx(np.std(aucs, ddof=1))
        assert all(t["n_train"] == round(float(f) * 400) for t in trials)
    assert out["auc_macro@0.5"] > 0.9
    assert out["headline"] == ["auc_macro@0.1", "f1_macro@0.1", "auc_macro@0.5", "f1_macro@0.5"]
    assert out["protocol"]["fractions"] == [0.1, 0.5] and out["protocol"]["trials"] == 3
    assert ev.evaluate(FlattenEncoder(rec.spec), rec, ctx) == out


@pytest.mark.parametrize("options, key", [
    ({"fractions": [0.0]}, "fractions"),
    ({"fractions": [1.5]}, "fractions"),
    ({"fractions": []}, "fractions"),
    ({"fractions": [0.1, 0.1]}, "fractions"),
    ({"trials": 0}, "trials"),
])
def test_bad_options(options, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        collect(load_entry_points=False).build("evaluator", "low_shot", options, "eval")
