"""Classification and regression metrics with percentile bootstrap intervals.

All functions take NumPy arrays. Classification targets are ``[N, C]`` multi-hot (multi-label)
or one-hot (multi-class) arrays, scores are ``[N, C]`` probabilities. AUCs are computed with the
Mann-Whitney rank statistic (ties count one half), which equals scikit-learn's
``roc_auc_score``; it is vectorised over classes so that bootstrap intervals stay cheap.

A class whose targets take a single value in the scored split has no AUC; it is *excluded* from
the macro mean (and from macro F1, so both means run over the same classes) and reported by
name in ``classes_excluded``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy.stats import rankdata


def _as_2d(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    return y[:, None] if y.ndim == 1 else y


def per_class_auc_array(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """ROC AUC of every column ``[C]``; NaN where the column's targets take a single value."""
    y = _as_2d(y_true) > 0.5
    s = _as_2d(np.asarray(y_score, dtype=np.float64))
    if y.shape != s.shape:
        raise ValueError(f"targets {y.shape} and scores {s.shape} differ in shape")
    n = y.shape[0]
    n_pos = y.sum(axis=0).astype(np.float64)
    n_neg = n - n_pos
    ranks = rankdata(s, axis=0)  # average ranks for ties
    rank_sum = (ranks * y).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def scored_classes(y_true: np.ndarray) -> np.ndarray:
    """Bool ``[C]``: columns that hold both label values (the classes a metric can score)."""
    y = _as_2d(y_true) > 0.5
    n_pos = y.sum(axis=0)
    return (n_pos > 0) & (n_pos < y.shape[0])


def per_class_auc(
    y_true: np.ndarray, y_score: np.ndarray, class_names: Sequence[str] | None = None
) -> tuple[dict[str, float], list[str]]:
    """Per-class AUC as ``{class: auc}`` plus the names of the classes excluded (one label value)."""
    auc = per_class_auc_array(y_true, y_score)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(auc))]
    scores = {name: float(a) for name, a in zip(names, auc) if np.isfinite(a)}
    excluded = [name for name, a in zip(names, auc) if not np.isfinite(a)]
    return scores, excluded


def auc_macro(y_true: np.ndarray, y_score: np.ndarray, classes: np.ndarray | None = None) -> float:
    """Mean of per-class ROC AUCs over the scorable classes (NaN if none).

    With ``classes`` (a bool mask or index array) the mean runs over exactly those classes and is
    NaN if any of them cannot be scored -- used by the bootstrap so that every resample measures
    the same quantity.
    """
    auc = per_class_auc_array(y_true, y_score)
    if classes is None:
        finite = auc[np.isfinite(auc)]
        return float(finite.mean()) if finite.size else float("nan")
    chosen = auc[classes]
    return float(chosen.mean()) if chosen.size and np.all(np.isfinite(chosen)) else float("nan")


def ovr_auc_macro(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """One-vs-rest macro AUC for multi-class data (class indices ``[N]`` or one-hot ``[N, C]``)."""
    y_prob = np.asarray(y_prob)
    y = np.asarray(y_true)
    if y.ndim == 1:
        y = np.eye(y_prob.shape[1])[y.astype(int)]
    return auc_macro(y, y_prob)


def per_class_f1_array(
    y_true: np.ndarray, y_score: np.ndarray, threshold: float = 0.5, multi_label: bool = True
) -> np.ndarray:
    """F1 of every class ``[C]``: scores >= ``threshold`` (multi-label) or argmax (multi-class).

    A class with no true and no predicted positive gets F1 0 (scikit-learn's ``zero_division=0``).
    """
    y = _as_2d(y_true) > 0.5
    s = _as_2d(np.asarray(y_score))
    if multi_label:
        pred = s >= threshold
    else:
        pred = np.zeros_like(y)
        pred[np.arange(len(s)), np.argmax(s, axis=1)] = True
    tp = (pred & y).sum(axis=0).astype(np.float64)
    fp = (pred & ~y).sum(axis=0)
    fn = (~pred & y).sum(axis=0)
    denom = 2 * tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def f1_macro(
    y_true: np.ndarray,
    y_score: np.ndarray,
    threshold: float = 0.5,
    multi_label: bool = True,
    classes: np.ndarray | None = None,
) -> float:
    """Macro F1 over ``classes`` (default: the scorable classes, as for :func:`auc_macro`)."""
    f1 = per_class_f1_array(y_true, y_score, threshold, multi_label)
    mask = scored_classes(y_true) if classes is None else classes
    chosen = f1[mask]
    return float(chosen.mean()) if chosen.size else float("nan")


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute error."""
    return float(np.mean(np.abs(np.asarray(y_true, np.float64) - np.asarray(y_pred, np.float64))))


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float | np.ndarray],
    y_true: np.ndarray,
    y_score: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple:
    """Percentile bootstrap interval ``(lo, hi)`` of ``metric_fn(y_true, y_score)``.

    Records are resampled with replacement ``n_resamples`` times from a generator seeded with
    ``seed``. A resample whose metric is not finite (e.g. a class lost all its positives) is
    redrawn, at most ``10 * n_resamples`` draws in all. ``metric_fn`` may return a scalar or a
    1-D array (several metrics on the same resamples); ``lo``/``hi`` then have its shape.
    ``(nan, nan)`` when no resample could be scored or ``n_resamples`` is 0.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score)
    n = len(y_true)
    probe = np.asarray(metric_fn(y_true, y_score), dtype=np.float64)
    nan = np.full(probe.shape, np.nan)
    if n_resamples <= 0 or n == 0:
        return (float(nan), float(nan)) if probe.ndim == 0 else (nan, nan.copy())
    rng = np.random.default_rng(seed)
    values = []
    draws = 0
    while len(values) < n_resamples and draws < 10 * n_resamples:
        idx = rng.integers(0, n, size=n)
        draws += 1
        v = np.asarray(metric_fn(y_true[idx], y_score[idx]), dtype=np.float64)
        if np.all(np.isfinite(v)):
            values.append(v)
    if not values:
        return (float(nan), float(nan)) if probe.ndim == 0 else (nan, nan.copy())
    stacked = np.stack(values)
    lo = np.percentile(stacked, 100 * alpha / 2, axis=0)
    hi = np.percentile(stacked, 100 * (1 - alpha / 2), axis=0)
    if probe.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


def score_classification(
    y_true: np.ndarray,
    y_score: np.ndarray,
    class_names: Sequence[str],
    multi_label: bool = True,
    threshold: float = 0.5,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """The classification metrics every evaluator reports, with bootstrap intervals.

    Returns ``auc_macro``, ``f1_macro``, ``auc_per_class`` (``{class: auc}``), their ``*_ci``
    intervals (when ``n_resamples > 0``), ``classes_excluded`` and ``n_records``. For
    multi-class data (``multi_label=False``) AUC is one-vs-rest and F1 uses the argmax.
    """
    y_true = _as_2d(y_true).astype(np.float64)
    y_score = _as_2d(y_score).astype(np.float64)
    names = list(class_names)
    mask = scored_classes(y_true)
    idx = np.flatnonzero(mask)
    out: dict = {}
    auc = per_class_auc_array(y_true, y_score)
    f1 = per_class_f1_array(y_true, y_score, threshold, multi_label)
    out["auc_macro"] = float(auc[idx].mean()) if idx.size else float("nan")
    out["f1_macro"] = float(f1[idx].mean()) if idx.size else float("nan")
    out["auc_per_class"] = {names[i]: float(auc[i]) for i in idx}
    out["f1_per_class"] = {names[i]: float(f1[i]) for i in idx}
    out["classes_excluded"] = [names[i] for i in np.flatnonzero(~mask)]
    out["n_records"] = int(len(y_true))
    if n_resamples > 0 and idx.size:

        def _all(yt: np.ndarray, ys: np.ndarray) -> np.ndarray:
            a = per_class_auc_array(yt[:, idx], ys[:, idx])
            f = per_class_f1_array(yt, ys, threshold, multi_label)[idx]
            return np.concatenate([[a.mean(), f.mean()], a])

        lo, hi = bootstrap_ci(_all, y_true, y_score, n_resamples=n_resamples, seed=seed, alpha=alpha)
        out["auc_macro_ci"] = [float(lo[0]), float(hi[0])]
        out["f1_macro_ci"] = [float(lo[1]), float(hi[1])]
        out["auc_per_class_ci"] = {
            names[i]: [float(lo[2 + j]), float(hi[2 + j])] for j, i in enumerate(idx)
        }
    return out
