"""knn, clustering, feature_regression, stats_baseline, reduced_leads, finetune: checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import welch
from scipy.stats import kurtosis, skew
from sklearn.decomposition import PCA
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.metrics import (
    calinski_harabasz_score,
    davies_bouldin_score,
    roc_auc_score,
    silhouette_score,
)
from torch import nn

from ssl4ecg.data.records import RecordSet
from ssl4ecg.errors import ConfigError
from ssl4ecg.eval.clustering import Clustering
from ssl4ecg.eval.feature_regression import FeatureRegression
from ssl4ecg.eval.finetune import Finetune, layer_ids, reinitialise
from ssl4ecg.eval.knn import KNN
from ssl4ecg.eval.reduced_leads import ReducedLeads
from ssl4ecg.eval.stats_baseline import StatsBaseline, feature_names, signal_statistics
from ssl4ecg.eval.testing import FlattenEncoder, features_as_records, synthetic_records
from ssl4ecg.interfaces import EvalContext, Encoder

LEADS = ("I", "II", "V1")


def ctx(out_dir=None, seed=0):
    return EvalContext(device=torch.device("cpu"), seed=seed, out_dir=out_dir)


# ---- knn ------------------------------------------------------------------------------------

def test_knn_scores_are_cosine_neighbour_fractions():
    rec = synthetic_records(n_per_split=(120, 40, 40), separation=2.0, seed=4)
    out = KNN(k=7, bootstrap=0).evaluate(FlattenEncoder(rec.spec), rec, ctx())
    x, y = rec.signals[:, 0].astype(np.float64), rec.labels
    tr, te = rec.splits == "train", rec.splits == "test"
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = 1 - xn[te] @ xn[tr].T
    nearest = np.argsort(dist, axis=1)[:, :7]
    scores = y[tr][nearest].mean(axis=1)
    expected = np.mean([roc_auc_score(y[te][:, c], scores[:, c]) for c in range(3)])
    assert out["auc_macro"] == pytest.approx(expected)
    assert out["k"] == 7


def test_knn_k_chosen_on_val():
    rec = synthetic_records(n_per_split=(150, 60, 60), separation=2.0, seed=5)
    out = KNN(k_grid=(1, 5, 15), bootstrap=0).evaluate(FlattenEncoder(rec.spec), rec, ctx())
    by_k = out["val_auc_by_k"]
    assert out["k"] == int(max(by_k, key=by_k.get))
    with pytest.raises(ConfigError, match="'k'"):
        KNN(k=500).evaluate(FlattenEncoder(rec.spec), rec, ctx())
    with pytest.raises(ConfigError, match="'metric'"):
        KNN(metric="cosinus")


# ---- clustering -----------------------------------------------------------------------------

def test_clustering_matches_sklearn_and_saves_embeddings(tmp_path):
    rec = synthetic_records(n_per_split=(50, 30, 90), multi_label=False, separation=3.0, seed=6)
    labels = rec.labels.copy()
    test = np.flatnonzero(rec.splits == "test")
    labels[test[:5]] = 1.0  # five multi-label records are dropped
    rec.labels = labels
    out = Clustering().evaluate(FlattenEncoder(rec.spec), rec, ctx(tmp_path))
    keep = test[5:]
    x, k = rec.signals[keep, 0], rec.labels[keep].argmax(1)
    assert out["davies_bouldin"] == pytest.approx(davies_bouldin_score(x, k), rel=1e-5)
    assert out["silhouette"] == pytest.approx(silhouette_score(x, k), rel=1e-5)
    assert out["calinski_harabasz"] == pytest.approx(calinski_harabasz_score(x, k), rel=1e-5)
    assert out["n_records"] == 85 and out["n_dropped_not_single_label"] == 5
    saved = np.load(tmp_path / out["embeddings_file"])
    np.testing.assert_array_equal(saved["labels"], k)
    out_pca = Clustering(pca=2, split="val", save_embeddings=False).evaluate(FlattenEncoder(rec.spec), rec, ctx())
    val = np.flatnonzero(rec.splits == "val")
    z = PCA(n_components=2, random_state=0).fit_transform(rec.signals[val, 0].astype(np.float64))
    assert out_pca["davies_bouldin"] == pytest.approx(davies_bouldin_score(z, rec.labels[val].argmax(1)), rel=1e-5)


def test_clustering_bad_options():
    with pytest.raises(ConfigError, match="'split'"):
        Clustering(split="testing")
    rec = synthetic_records(n_per_split=(10, 10, 10), multi_label=False)
    with pytest.raises(ConfigError, match="'pca'"):
        Clustering(pca=50).evaluate(FlattenEncoder(rec.spec), rec, ctx())


# ---- feature regression ---------------------------------------------------------------------

def _regression_records():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 5))
    hr = 70 + 8 * x[:, 0] - 3 * x[:, 2] + rng.normal(0, 2.0, 300)
    hr[[0, 5, 150, 299]] = np.nan
    splits = np.repeat(["train", "val", "test"], [180, 60, 60])
    return features_as_records(x, None, splits, extra={"heart_rate": hr})


def test_feature_regression_matches_sklearn_and_skips_nan():
    rec = _regression_records()
    ev = FeatureRegression(targets=("heart_rate",), ridge_alphas=(0.0, 10.0, 1000.0), bootstrap=200)
    out = ev.evaluate(FlattenEncoder(rec.spec), rec, ctx())
    details = out["details@heart_rate"]
    assert details["n_skipped_nan"] == {"train": 3, "val": 0, "test": 1}
    # refit by hand with the chosen penalty
    x, y = rec.signals[:, 0].astype(np.float64), rec.extra["heart_rate"]
    ok = np.isfinite(y)
    tr, va, te = [(rec.splits == s) & ok for s in ("train", "val", "test")]
    mu, sd = x[tr].mean(0), x[tr].std(0)
    z = (x - mu) / sd
    val_mae = {a: np.abs((LinearRegression() if a == 0 else Ridge(alpha=a)).fit(z[tr], y[tr]).predict(z[va]) - y[va]).mean()
               for a in (0.0, 10.0, 1000.0)}
    chosen = min(val_mae, key=val_mae.get)
    assert details["ridge_alpha"] == chosen
    model = LinearRegression() if chosen == 0 else Ridge(alpha=chosen)
    err = np.abs(model.fit(z[tr], y[tr]).predict(z[te]) - y[te])
    assert out["mae@heart_rate"] == pytest.approx(err.mean())
    assert out["mae@heart_rate_std"] == pytest.approx(err.std())
    lo, hi = out["mae@heart_rate_ci"]
    assert lo < out["mae@heart_rate"] < hi
    assert out["mae@heart_rate"] < 2.5  # noise std 2 -> MAE ~1.6


def test_feature_regression_missing_target_and_target_fn():
    rec = _regression_records()
    with pytest.raises(ConfigError, match="'targets'.*qrs_ms"):
        FeatureRegression(targets=("qrs_ms",)).evaluate(FlattenEncoder(rec.spec), rec, ctx())

    def qrs(records):
        return {"qrs_ms": 90 + 5 * records.signals[:, 0, 1]}

    out = FeatureRegression(targets=("qrs_ms",), target_fn=qrs, bootstrap=0).evaluate(
        FlattenEncoder(rec.spec), rec, ctx())
    assert out["mae@qrs_ms"] < 1e-4  # an exact linear function of a (float32) feature
    with pytest.raises(ConfigError, match="'target_fn'"):
        FeatureRegression(target_fn="no_such_module_xyz:fn")


# ---- stats baseline -------------------------------------------------------------------------

def test_signal_statistics_by_hand():
    fs, t = 100.0, np.arange(1000) / 100.0
    sig = np.stack([2 * np.sin(2 * np.pi * 10 * t), np.random.default_rng(0).normal(size=1000)])[None]
    bands = ((0.5, 5.0), (5.0, 15.0), (15.0, 40.0))
    f = signal_statistics(sig.astype(np.float32), fs, bands)
    names = feature_names(("A", "B"), bands)
    assert f.shape == (1, len(names))
    col = {n: f[0, i] for i, n in enumerate(names)}
    x = sig[0, 1].astype(np.float32).astype(np.float64)
    assert col["B:std"] == pytest.approx(x.std())
    assert col["B:p75"] == pytest.approx(np.percentile(x, 75))
    assert col["B:skew"] == pytest.approx(skew(x))
    assert col["B:kurtosis"] == pytest.approx(kurtosis(x))
    freqs, p = welch(x, fs=fs, nperseg=200)
    band = (freqs >= 5) & (freqs < 15)
    assert col["B:logpow_5-15Hz"] == pytest.approx(np.log10(p[band].sum() * (freqs[1] - freqs[0]) + 1e-12))
    assert col["A:max"] == pytest.approx(sig[0, 0].astype(np.float32).max())
    assert col["A:min"] == pytest.approx(-col["A:max"], abs=1e-5)
    # a 10 Hz sine has its power in the 5-15 Hz band
    assert col["A:logpow_5-15Hz"] > col["A:logpow_0.5-5Hz"] + 3


def _signal_records(n=240, t_len=300, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 2)) < 0.4).astype(np.float32)
    t = np.arange(t_len) / 100.0
    sig = rng.normal(size=(n, 3, t_len)).astype(np.float32)
    sig[:, 1] += (y[:, 0, None] * 2 * np.sin(2 * np.pi * 8 * t)).astype(np.float32)  # class 0: lead II rhythm
    sig[:, 2] += y[:, 1, None] * 1.5  # class 1: V1 offset
    splits = np.repeat(["train", "val", "test"], [n // 2, n // 4, n - n // 2 - n // 4])
    return RecordSet(signals=sig, leads=LEADS, sampling_rate=100.0, record_ids=np.arange(n),
                     splits=splits, labels=y, class_names=("rhythm", "offset"))


def test_stats_baseline_ignores_encoder_and_separates():
    rec = _signal_records()
    out = StatsBaseline(bootstrap=100).evaluate(None, rec, ctx())
    assert out["auc_macro"] > 0.95
    best_c = max(out["val_auc_by_C"].items(), key=lambda kv: kv[1])[0]
    assert f"{out['C']:g}" == best_c
    assert out["n_features"] == 3 * 14
    with pytest.raises(ConfigError, match="'bands'"):
        StatsBaseline(bands=((10.0, 80.0),)).evaluate(None, rec, ctx())
    with pytest.raises(ConfigError, match="'bands'"):
        StatsBaseline(bands=((5.0, 1.0),))


# ---- reduced leads --------------------------------------------------------------------------

def test_reduced_leads_uses_only_the_chosen_leads():
    rec = _signal_records(n=200, t_len=100)
    enc = FlattenEncoder(rec.spec)
    out = ReducedLeads(lead_sets=(("V1",), ("I",)), lr=0.05, bootstrap=0).evaluate(enc, rec, ctx())
    # the offset class lives in V1 only; lead I carries no label information
    assert out["details@V1"]["auc_per_class"]["offset"] > 0.95
    assert abs(out["details@I"]["auc_per_class"]["offset"] - 0.5) < 0.2
    assert out["headline"] == ["auc_macro@V1", "f1_macro@V1", "auc_macro@I", "f1_macro@I"]
    with pytest.raises(ConfigError, match="'lead_sets'.*aVF"):
        ReducedLeads(lead_sets=(("aVF",),)).evaluate(enc, rec, ctx())
    with pytest.raises(ConfigError, match="'lead_sets'"):
        ReducedLeads(lead_sets=("II",))


# ---- finetune -------------------------------------------------------------------------------

class TinyConv(Encoder):
    def __init__(self, spec):
        super().__init__()
        self.spec, self.embed_dim = spec, 8
        self.stem = nn.Conv1d(spec.n_leads, 8, 5, stride=2)
        self.lead_emb = nn.Parameter(torch.zeros(spec.n_leads))
        self.blocks = nn.ModuleList([nn.Conv1d(8, 8, 3, padding=1) for _ in range(2)])
        self.norm = nn.LayerNorm(8)

    def tokens(self, x, leads=None):
        idx = self.lead_indices(leads)
        full = x.new_zeros(x.shape[0], self.spec.n_leads, x.shape[2])
        full[:, idx] = x + self.lead_emb[idx, None]
        h = torch.relu(self.stem(full))
        for b in self.blocks:
            h = h + torch.relu(b(h))
        return self.norm(h.transpose(1, 2))


def test_finetune_leaves_encoder_untouched_and_chooses_on_val():
    rec = _signal_records(n=160, t_len=100)
    enc = TinyConv(rec.spec)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    ev = Finetune(epochs=6, base_lr=0.05, batch_size=16, bootstrap=0)
    out = ev.evaluate(enc, rec, ctx())
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert out["epoch"] == int(np.argmax(out["val_auc_history"])) + 1
    assert out["lr"] == pytest.approx(0.05 * 16 / 256)
    assert out["auc_macro"] > 0.75  # 0.82-1.0 over encoder seeds 0-3
    assert ev.evaluate(enc, rec, ctx()) == out


def test_from_scratch_reinitialises_every_parameter():
    enc = TinyConv(_signal_records(n=8, t_len=100).spec)
    with torch.no_grad():
        for p in enc.parameters():
            p.fill_(0.123)
    info = reinitialise(enc, seed=0)
    assert info["parameters_redrawn"] == 1  # lead_emb: no module reset covers it
    assert all(not torch.all(p == 0.123) for p in enc.parameters() if p.numel() > 1 and p.ndim > 1)
    assert torch.all(enc.norm.weight == 1)  # LayerNorm's own reset
    again = TinyConv(enc.spec)
    reinitialise(again, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(enc.parameters(), again.parameters()))


def test_layer_ids_for_layer_decay():
    enc = TinyConv(_signal_records(n=8, t_len=100).spec)
    ids, n_layers = layer_ids(enc)
    assert n_layers == 3
    assert ids["stem.weight"] == 0 and ids["lead_emb"] == 0
    assert ids["blocks.0.weight"] == 1 and ids["blocks.1.bias"] == 2
    assert ids["norm.weight"] == 3
    with pytest.raises(ConfigError, match="'layer_decay'"):
        layer_ids(FlattenEncoder(enc.spec))


class BatchNormConv(TinyConv):
    def __init__(self, spec):
        super().__init__(spec)
        self.bn = nn.BatchNorm1d(8)

    def tokens(self, x, leads=None):
        return super().tokens(x, leads) + self.bn(torch.ones(x.shape[0], 8)).unsqueeze(1)


def test_finetune_skips_a_last_batch_of_one_record():
    rec = _signal_records(n=34, t_len=100, seed=3)  # 17 train records, batch 16 -> 16 + 1
    out = Finetune(epochs=1, batch_size=16, bootstrap=0).evaluate(BatchNormConv(rec.spec), rec, ctx())
    assert out["epochs_run"] == 1 and out["n_train"] == 17
