"""k-nearest-neighbour evaluation on frozen features (no training at all)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.neighbors import NearestNeighbors

from ssl4ecg.errors import ConfigError
from ssl4ecg.eval.common import check_choice, check_float, check_positive_int, prepare_task
from ssl4ecg.eval.features import extract_features
from ssl4ecg.eval.metrics import auc_macro, score_classification
from ssl4ecg.interfaces import EvalContext, Encoder, Evaluator

METRICS = ("cosine", "euclidean", "manhattan")


def neighbour_scores(y_train: np.ndarray, neighbours: np.ndarray, k: int, multi_label: bool) -> np.ndarray:
    """Class scores ``[n, C]``: the fraction of the ``k`` nearest train records with each label.

    For multi-class data a tiny bonus for the nearest neighbour's class breaks ties of the argmax
    (it never reorders different fractions, so AUCs are unaffected beyond ties).
    """
    nb = neighbours[:, :k]
    scores = y_train[nb].mean(axis=1)
    if not multi_label:
        scores = scores + 1e-9 * y_train[nb[:, 0]]
    return scores


class KNN(Evaluator):
    """k-NN classifier on frozen features: scores are neighbour label fractions among train.

    AUC is computed from the fractions, F1 thresholds them at ``threshold`` (multi-label) or takes
    the majority class (multi-class, ties to the nearest neighbour). With ``k_grid`` the k with
    the best val macro AUC is used; otherwise ``k``. Neighbours come from the train split only.
    """

    name = "knn"

    def __init__(
        self,
        k: int = 10,
        metric: str = "cosine",
        k_grid: tuple = (),
        multi_label: bool = True,
        standardize: bool = False,
        threshold: float = 0.5,
        bootstrap: int = 1000,
        alpha: float = 0.05,
    ) -> None:
        n = self.name
        self.k = check_positive_int(n, "k", k)
        self.metric = check_choice(n, "metric", metric, METRICS)
        if not isinstance(k_grid, (list, tuple)):
            raise ConfigError(f"evaluator '{n}': key 'k_grid' must be a list of integers, got {k_grid!r}.")
        self.k_grid = tuple(check_positive_int(n, "k_grid", v) for v in k_grid)
        self.multi_label = bool(multi_label)
        self.standardize = bool(standardize)
        self.threshold = check_float(n, "threshold", threshold, 0.0, 1.0)
        self.bootstrap = check_positive_int(n, "bootstrap", bootstrap, minimum=0)
        self.alpha = check_float(n, "alpha", alpha, 0.0, 0.5, low_open=True)

    def protocol(self) -> dict[str, Any]:
        """Evaluator name and options."""
        return {
            "evaluator": self.name, "k": self.k, "metric": self.metric, "k_grid": list(self.k_grid),
            "multi_label": self.multi_label, "standardize": self.standardize,
            "threshold": self.threshold, "bootstrap": self.bootstrap, "alpha": self.alpha,
            "selection": "val auc_macro" if self.k_grid else "none",
        }

    def evaluate(self, encoder: Encoder, records, context: EvalContext) -> dict[str, Any]:
        """Neighbours of val/test records among train; k chosen on val when ``k_grid`` is set."""
        task = prepare_task(records, self.multi_label, self.name)
        feats = {s: extract_features(encoder, records.subset(task.index[s]), context) for s in task.index}
        ks = self.k_grid or (self.k,)
        n_train = len(feats["train"])
        if max(ks) > n_train:
            key = "k_grid" if self.k_grid else "k"
            raise ConfigError(f"evaluator '{self.name}': key '{key}' asks for {max(ks)} neighbours but train has {n_train} records.")
        if self.standardize:
            mean, std = feats["train"].mean(axis=0), feats["train"].std(axis=0)
            std = np.where(std > 1e-8, std, 1.0)
            feats = {s: (v - mean) / std for s, v in feats.items()}
        nn_index = NearestNeighbors(n_neighbors=max(ks), metric=self.metric, algorithm="brute")
        nn_index.fit(feats["train"])
        y_train = task.targets["train"]
        neigh = {s: nn_index.kneighbors(feats[s], return_distance=False) for s in ("val", "test")}
        val_aucs = {k: auc_macro(task.targets["val"], neighbour_scores(y_train, neigh["val"], k, self.multi_label))
                    for k in ks}
        finite = {k: v for k, v in val_aucs.items() if np.isfinite(v)}
        if not finite:
            raise ConfigError("the val split has no class with both positive and negative records; use a larger val split.")
        best_k = max(finite, key=lambda k: (finite[k], -k))  # best val AUC, then the smallest k
        scores = neighbour_scores(y_train, neigh["test"], best_k, self.multi_label)
        out = score_classification(
            task.targets["test"], scores, task.class_names, multi_label=self.multi_label,
            threshold=self.threshold, n_resamples=self.bootstrap, seed=context.seed, alpha=self.alpha,
        )
        out.update(
            k=int(best_k), val_auc_macro=float(val_aucs[best_k]),
            val_auc_by_k={str(k): float(v) for k, v in val_aucs.items()},
            headline=["auc_macro", "f1_macro"], protocol={**self.protocol(), **task.protocol()},
        )
        return out
