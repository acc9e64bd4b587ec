"""Linear probe: reaches AUC ~1 on separable features, chooses on val only, deterministic.

Both solvers: ``lbfgs`` (converged logistic regression, the default; checked against
scikit-learn) and ``adamw`` (ECG-JEPA's 10-epoch protocol)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl4ecg.errors import ConfigError
from ssl4ecg.eval.linear_probe import LinearProbe, fit_logistic, fit_probe
from ssl4ecg.eval.metrics import auc_macro
from ssl4ecg.eval.testing import FlattenEncoder, features_as_records, synthetic_records
from ssl4ecg.interfaces import EvalContext
from ssl4ecg.registry import collect


def ctx(seed=0):
    return EvalContext(device=torch.device("cpu"), seed=seed, out_dir=None)


@pytest.fixture(scope="module")
def separable():
    return synthetic_records(n_per_split=(300, 100, 100), n_classes=3, dim=6, separation=8.0, seed=0)


def test_separable_features_reach_auc_one(separable):
    out = LinearProbe(solver="adamw", lr=0.05, bootstrap=200).evaluate(FlattenEncoder(separable.spec), separable, ctx())
    assert out["auc_macro"] > 0.99
    assert out["f1_macro"] > 0.9
    assert set(out["auc_per_class"]) == {"c0", "c1", "c2"}
    assert all(v > 0.98 for v in out["auc_per_class"].values())
    lo, hi = out["auc_macro_ci"]
    assert lo <= out["auc_macro"] <= hi
    proto = out["protocol"]
    assert proto["evaluator"] == "linear_probe" and proto["classes"] == ["c0", "c1", "c2"]
    assert proto["split_sizes"] == {"train": 300, "val": 100, "test": 100}
    # the choice is the best val epoch (earliest on ties)
    hist = out["val_auc_history"]
    assert len(hist) == 10
    assert out["epoch"] == int(np.argmax(hist)) + 1
    assert out["val_auc_macro"] == pytest.approx(max(hist))


def test_shuffled_test_labels_do_not_change_the_choice():
    rec = synthetic_records(n_per_split=(200, 80, 80), separation=1.5, seed=1)
    probe = LinearProbe(solver="adamw", lr=0.02, bootstrap=0, lr_grid=(0.002, 0.02))
    a = probe.evaluate(FlattenEncoder(rec.spec), rec, ctx())
    test = np.flatnonzero(rec.splits == "test")
    shuffled = rec.subset(np.arange(len(rec)))
    shuffled.labels = rec.labels.copy()
    shuffled.labels[test] = rec.labels[np.random.default_rng(0).permutation(test)]
    b = probe.evaluate(FlattenEncoder(rec.spec), shuffled, ctx())
    for key in ("epoch", "lr", "val_auc_macro", "val_auc_history"):
        assert a[key] == b[key]
    assert a["auc_macro"] > 0.7 and abs(b["auc_macro"] - 0.5) < 0.15


def test_val_labels_drive_the_choice():
    # a head that barely moves from its random start (lr 1e-5) scores ~0.5 on val; a trained one
    # scores high on true val labels and low on inverted ones: the choice must follow val
    rec = synthetic_records(n_per_split=(200, 80, 80), separation=1.5, seed=1)
    probe = LinearProbe(solver="adamw", bootstrap=0, lr_grid=(1e-5, 0.05), head_init="default")
    a = probe.evaluate(FlattenEncoder(rec.spec), rec, ctx())
    assert a["lr"] == 0.05
    val = np.flatnonzero(rec.splits == "val")
    flipped = rec.subset(np.arange(len(rec)))
    flipped.labels = rec.labels.copy()
    flipped.labels[val] = 1.0 - rec.labels[val]  # anti-correlated val labels favour the untrained head
    b = probe.evaluate(FlattenEncoder(rec.spec), flipped, ctx())
    assert b["lr"] == 1e-5
    assert a["val_auc_macro"] > 0.8 and 0.3 < b["val_auc_macro"] < 0.7


def test_deterministic_given_seed(separable):
    probe = LinearProbe(solver="adamw", lr=0.01, bootstrap=50)
    enc = FlattenEncoder(separable.spec)
    a, b = probe.evaluate(enc, separable, ctx(3)), probe.evaluate(enc, separable, ctx(3))
    assert a == b
    c = probe.evaluate(enc, separable, ctx(4))
    assert c["val_auc_history"] != a["val_auc_history"]


def test_lbfgs_separable_reaches_auc_one_and_reports_its_choice(separable):
    out = LinearProbe(bootstrap=200).evaluate(FlattenEncoder(separable.spec), separable, ctx())
    assert out["auc_macro"] > 0.99 and out["f1_macro"] > 0.9
    assert out["protocol"]["solver"] == "lbfgs" and "epochs" not in out["protocol"]
    by_l2 = out["val_auc_by_l2"]
    assert set(by_l2) == {"1e-05", "0.0001", "0.001", "0.01", "0.1", "1"}
    assert out["val_auc_macro"] == max(by_l2.values())
    assert by_l2[f"{out['l2']:g}"] == out["val_auc_macro"]
    assert "epoch" not in out and out["iterations"] > 0


def test_lbfgs_matches_scikit_learn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 7))
    logits = x @ rng.normal(size=(7, 3))
    y_multi = (logits + rng.normal(size=logits.shape) > 0.5).astype(np.float64)
    l2 = 0.01
    fit = fit_logistic(x, y_multi, x, y_multi, l2_grid=(l2,), standardize=False)
    for c in range(3):  # multi-label: one-vs-rest, C = 1 / (l2 * n)
        ref = LogisticRegression(C=1.0 / (l2 * len(x)), tol=1e-10, max_iter=10_000).fit(x, y_multi[:, c])
        np.testing.assert_allclose(fit.weight[c], ref.coef_[0], atol=1e-5)
        np.testing.assert_allclose(fit.bias[c], ref.intercept_[0], atol=1e-5)
    y_class = np.eye(3)[np.argmax(logits + rng.normal(size=logits.shape), axis=1)]
    fit = fit_logistic(x, y_class, x, y_class, multi_label=False, l2_grid=(l2,), standardize=False)
    ref = LogisticRegression(C=1.0 / (l2 * len(x)), tol=1e-10, max_iter=10_000).fit(x, y_class.argmax(1))
    np.testing.assert_allclose(fit.predict(x), ref.predict_proba(x), atol=1e-6)


def test_lbfgs_finds_a_signal_that_ten_adamw_epochs_miss():
    # five strong shared directions hide a weak label direction (the conditioning of a young
    # encoder's pooled features): gradient steps barely move along it in 10 epochs, L-BFGS does
    rng = np.random.default_rng(0)
    mix, signal = np.random.default_rng(1).normal(size=(5, 300)), np.random.default_rng(2).normal(size=(2, 300))

    def make(n):
        y = (rng.random((n, 2)) < 0.3).astype(np.float64)
        x = 3 * rng.normal(size=(n, 5)) @ mix + 0.05 * (0.7 * (y - 0.3) @ signal + rng.normal(size=(n, 300)))
        return x + 10.0, y

    (xtr, ytr), (xva, yva), (xte, yte) = make(600), make(200), make(200)
    converged = fit_logistic(xtr, ytr, xva, yva)
    paper = fit_probe(xtr, ytr, xva, yva)
    assert auc_macro(yte, converged.predict(xte)) > 0.95
    assert auc_macro(yte, paper.predict(xte)) < 0.7


def test_lbfgs_choice_ignores_test_labels():
    rec = synthetic_records(n_per_split=(200, 80, 80), separation=1.5, seed=1)
    a = LinearProbe(bootstrap=0).evaluate(FlattenEncoder(rec.spec), rec, ctx())
    test = np.flatnonzero(rec.splits == "test")
    shuffled = rec.subset(np.arange(len(rec)))
    shuffled.labels = rec.labels.copy()
    shuffled.labels[test] = rec.labels[np.random.default_rng(0).permutation(test)]
    b = LinearProbe(bootstrap=0).evaluate(FlattenEncoder(rec.spec), shuffled, ctx())
    assert a["l2"] == b["l2"] and a["val_auc_by_l2"] == b["val_auc_by_l2"]
    assert a["auc_macro"] > 0.7 and abs(b["auc_macro"] - 0.5) < 0.15


def test_multiclass_drops_multilabel_records_and_uses_softmax():
    rec = synthetic_records(n_per_split=(300, 100, 100), multi_label=False, separation=5.0, seed=2)
    labels = rec.labels.copy()
    labels[:10] = 1.0  # ten training records with every label: not single-label
    rec.labels = labels
    out = LinearProbe(multi_label=False, lr=0.05, bootstrap=0).evaluate(FlattenEncoder(rec.spec), rec, ctx())
    assert out["n_dropped_not_single_label"] == {"train": 10, "val": 0, "test": 0}
    assert out["protocol"]["split_sizes"]["train"] == 290
    assert out["auc_macro"] > 0.97 and out["f1_macro"] > 0.85


def test_fit_probe_standardize_is_fitted_on_train():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, size=(50, 2))
    y = (x[:, :1] > 5).astype(float)
    fit = fit_probe(x, y, x, y, epochs=2, seed=0)
    np.testing.assert_allclose(fit.mean, x.mean(0))
    np.testing.assert_allclose(fit.scale, x.std(0))
    fit = fit_probe(x, y, x, y, epochs=2, seed=0, standardize=False)
    assert np.all(fit.mean == 0) and np.all(fit.scale == 1)


@pytest.mark.parametrize("options, key", [
    ({"epochs": 0}, "epochs"),
    ({"lr": -1.0}, "lr"),
    ({"lr_grid": [0.1, -0.1]}, "lr_grid"),
    ({"bootstrap": -5}, "bootstrap"),
    ({"alpha": 0.7}, "alpha"),
    ({"epoch": 3}, "epoch"),
    ({"solver": "sgd"}, "solver"),
    ({"l2_grid": []}, "l2_grid"),
    ({"l2_grid": [1e-3, -1.0]}, "l2_grid"),
    ({"max_iter": 0}, "max_iter"),
])
def test_bad_options_are_config_errors_naming_the_key(options, key):
    registry = collect(load_entry_points=False)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        registry.build("evaluator", "linear_probe", options, "eval")


def test_missing_val_split_and_unlabelled_data_are_config_errors():
    x = np.random.default_rng(0).normal(size=(20, 3))
    y = np.eye(2)[np.arange(20) % 2]
    rec = features_as_records(x, y, ["train"] * 15 + ["test"] * 5, ["a", "b"])
    with pytest.raises(ConfigError, match="'val'"):
        LinearProbe().evaluate(FlattenEncoder(rec.spec), rec, ctx())
    rec = features_as_records(x, None, ["train"] * 10 + ["val"] * 5 + ["test"] * 5)
    with pytest.raises(ConfigError, match="labelled"):
        LinearProbe().evaluate(FlattenEncoder(rec.spec), rec, ctx())


def test_prior_bias_and_head_init():
    from ssl4ecg.eval.linear_probe import prior_bias

    y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    # class 0: 3 of 4 -> log(3.5 / 1.5); class 1: 1 of 4 -> log(1.5 / 3.5)
    torch.testing.assert_close(prior_bias(y, 2, True), torch.log(torch.tensor([3.5 / 1.5, 1.5 / 3.5])))
    k = torch.tensor([0, 0, 1, 2])
    torch.testing.assert_close(prior_bias(k, 4, False).double(),
                               torch.log(torch.tensor([2.5, 1.5, 1.5, 0.5], dtype=torch.float64) / 6.0))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    yy = (x[:, :1] > 0).astype(float)
    # one zero-initialised epoch at a tiny lr barely moves from p = 0.5 / the prior
    fit = fit_probe(x, yy, x, yy, epochs=1, lrs=(1e-9,), warmup_epochs=0, head_init="zero")
    np.testing.assert_allclose(fit.predict(x), 0.5, atol=1e-6)
    fit = fit_probe(x, yy, x, yy, epochs=1, lrs=(1e-9,), warmup_epochs=0, head_init="prior")
    np.testing.assert_allclose(fit.predict(x), (yy.sum() + 0.5) / 41, atol=1e-6)
    with pytest.raises(ConfigError, match="'head_init'"):
        LinearProbe(head_init="xavier")


def test_every_evaluator_builds_from_defaults_and_saves_as_toml():
    import tomli_w

    registry = collect(load_entry_points=False)
    names = registry.names("evaluator")
    assert {"linear_probe", "finetune", "low_shot", "reduced_leads", "feature_regression", "knn",
            "clustering", "stats_baseline"} <= set(names)
    for name in names:
        ev = registry.build("evaluator", name, {}, "eval")
        proto = ev.protocol()
        assert proto["evaluator"] == name
        resolved = registry.resolved_options("evaluator", name, {})
        tomli_w.dumps({"eval": [{"name": name, **resolved}]})
        # the resolved options rebuild the same evaluator
        assert registry.build("evaluator", name, resolved, "eval").protocol() == proto
