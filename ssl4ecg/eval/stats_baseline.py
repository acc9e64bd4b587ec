"""The hand-crafted baseline row: per-lead signal statistics + logistic regression."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy.signal import welch
from scipy.stats import kurtosis, skew
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from ssl4ecg.errors import ConfigError
from ssl4ecg.eval.common import check_float, check_float_list, check_positive_int, prepare_task
from ssl4ecg.eval.metrics import auc_macro, score_classification
from ssl4ecg.interfaces import EvalContext, Encoder, Evaluator

PERCENTILES = (5, 25, 50, 75, 95)


def feature_names(leads: tuple[str, ...], bands: tuple[tuple[float, float], ...]) -> list[str]:
    """Names of the columns :func:`signal_statistics` returns, lead-major."""
    per_lead = (["mean", "std", "min", "max"] + [f"p{p}" for p in PERCENTILES] + ["skew", "kurtosis"]
                + [f"logpow_{lo:g}-{hi:g}Hz" for lo, hi in bands])
    return [f"{lead}:{f}" for lead in leads for f in per_lead]


def signal_statistics(
    signals: np.ndarray, sampling_rate: float, bands: tuple[tuple[float, float], ...],
    chunk: int = 256,
) -> np.ndarray:
    """Hand-crafted features ``[N, leads * F]`` of ``signals`` ``[N, leads, T]``.

    Per lead: mean, std, min, max, the 5/25/50/75/95th percentiles, skewness, excess kurtosis and,
    for every band ``(lo, hi)`` in Hz, ``log10`` of the Welch power (segments of up to 2 s, Hann
    window) integrated over ``lo <= f < hi``. Flat leads give skew/kurtosis 0.
    """
    n, n_leads, t = signals.shape
    nperseg = int(min(t, max(8, round(2 * sampling_rate))))
    out = []
    for start in range(0, n, chunk):
        x = np.asarray(signals[start:start + chunk], dtype=np.float64)
        cols = [x.mean(-1), x.std(-1), x.min(-1), x.max(-1)]
        cols += list(np.moveaxis(np.percentile(x, PERCENTILES, axis=-1), 0, 0))
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            cols.append(np.nan_to_num(skew(x, axis=-1), nan=0.0))
            cols.append(np.nan_to_num(kurtosis(x, axis=-1), nan=0.0))
        freqs, pxx = welch(x, fs=sampling_rate, nperseg=nperseg, axis=-1)
        df = freqs[1] - freqs[0] if len(freqs) > 1 else 1.0
        for lo, hi in bands:
            sel = (freqs >= lo) & (freqs < hi)
            cols.append(np.log10(pxx[..., sel].sum(-1) * df + 1e-12))
        feats = np.stack(cols, axis=-1)  # [n, leads, F]
        out.append(feats.reshape(len(x), -1))
    return np.concatenate(out) if out else np.zeros((0, 0))


class StatsBaseline(Evaluator):
    """Hand-crafted baseline: per-lead statistics and band powers, standardised logistic regression.

    Ignores the encoder entirely (the row every learned representation must beat). One binary
    logistic regression per class (multi-label) or a multinomial one (``multi_label=False``);
    the inverse regularisation ``C`` is chosen from ``C_grid`` by val macro AUC. Reports the same
    metrics as ``linear_probe``.
    """

    name = "stats_baseline"

    def __init__(
        self,
        multi_label: bool = True,
        C_grid: tuple = (0.001, 0.01, 0.1, 1.0, 10.0),
        bands: tuple = ((0.5, 5.0), (5.0, 15.0), (15.0, 40.0)),
        max_iter: int = 2000,
        threshold: float = 0.5,
        bootstrap: int = 1000,
        alpha: float = 0.05,
    ) -> None:
        n = self.name
        self.multi_label = bool(multi_label)
        self.C_grid = check_float_list(n, "C_grid", C_grid, 0.0, low_open=True, allow_empty=False)
        ok = isinstance(bands, (list, tuple)) and all(
            isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(v, (int, float)) for v in b)
            and 0 <= b[0] < b[1] for b in bands)
        if not ok:
            raise ConfigError(f"evaluator '{n}': key 'bands' must be a list of [low_hz, high_hz] pairs with low < high, got {bands!r}.")
        self.bands = tuple((float(lo), float(hi)) for lo, hi in bands)
        self.max_iter = check_positive_int(n, "max_iter", max_iter)
        self.threshold = check_float(n, "threshold", threshold, 0.0, 1.0)
        self.bootstrap = check_positive_int(n, "bootstrap", bootstrap, minimum=0)
        self.alpha = check_float(n, "alpha", alpha, 0.0, 0.5, low_open=True)

    def protocol(self) -> dict[str, Any]:
        """Evaluator name and options."""
        return {"evaluator": self.name, "multi_label": self.multi_label, "C_grid": list(self.C_grid),
                "bands": [list(b) for b in self.bands], "features": "per-lead stats + Welch band powers",
                "threshold": self.threshold, "bootstrap": self.bootstrap, "alpha": self.alpha,
                "selection": "val auc_macro"}

    def _fit(self, C: float, x_tr: np.ndarray, y_tr: np.ndarray):
        """Fit at ``C``; return ``predict(x) -> [n, C]`` class probabilities."""
        n_classes = y_tr.shape[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if not self.multi_label:
                model = LogisticRegression(C=C, max_iter=self.max_iter).fit(x_tr, np.argmax(y_tr, axis=1))

                def predict(x: np.ndarray) -> np.ndarray:
                    p = np.zeros((len(x), n_classes))
                    p[:, model.classes_] = model.predict_proba(x)
                    return p

                return predict
            models: list = []
            for c in range(n_classes):
                yc = y_tr[:, c] > 0.5
                if yc.all() or not yc.any():  # one label value in train: predict the prevalence
                    models.append(float(yc.mean()))
                else:
                    models.append(LogisticRegression(C=C, max_iter=self.max_iter).fit(x_tr, yc))

        def predict(x: np.ndarray) -> np.ndarray:
            return np.stack([np.full(len(x), m) if isinstance(m, float) else m.predict_proba(x)[:, 1]
                             for m in models], axis=1)

        return predict

    def evaluate(self, encoder: Encoder, records, context: EvalContext) -> dict[str, Any]:
        """Features of every record, C chosen on val, test scored once (the encoder is unused)."""
        nyquist = float(records.sampling_rate) / 2
        too_high = [list(b) for b in self.bands if b[1] > nyquist]
        if too_high:
            raise ConfigError(f"evaluator '{self.name}': key 'bands' has {too_high} above the Nyquist frequency {nyquist:g} Hz of the data.")
        if not isinstance(records.signals, np.ndarray):
            raise ConfigError("records are ragged (different lengths); preprocess them before evaluation.")
        task = prepare_task(records, self.multi_label, self.name)
        feats = {s: signal_statistics(records.signals[idx], float(records.sampling_rate), self.bands)
                 for s, idx in task.index.items()}
        mean, std = feats["train"].mean(axis=0), feats["train"].std(axis=0)
        std = np.where(std > 1e-8, std, 1.0)
        feats = {s: (v - mean) / std for s, v in feats.items()}
        best = None
        val_by_c = {}
        for C in self.C_grid:
            predict = self._fit(C, feats["train"], task.targets["train"])
            val_auc = auc_macro(task.targets["val"], predict(feats["val"]))
            val_by_c[f"{C:g}"] = float(val_auc)
            if np.isfinite(val_auc) and (best is None or val_auc > best[1]):
                best = (C, float(val_auc), predict)
        if best is None:
            raise ConfigError("the val split has no class with both positive and negative records; use a larger val split.")
        C, val_auc, predict = best
        test_scores = predict(feats["test"])  # the only time test is looked at
        out = score_classification(
            task.targets["test"], test_scores, task.class_names, multi_label=self.multi_label,
            threshold=self.threshold, n_resamples=self.bootstrap, seed=context.seed, alpha=self.alpha,
        )
        out.update(
            C=float(C), val_auc_macro=val_auc, val_auc_by_C=val_by_c,
            n_features=int(feats["train"].shape[1]),
            headline=["auc_macro", "f1_macro"], protocol={**self.protocol(), **task.protocol()},
        )
        return out
