"""Cluster-quality metrics of the true classes in embedding space (Davies-Bouldin, silhouette, CH)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

from ssl4ecg.errors import ConfigError
from ssl4ecg.eval.common import check_choice, check_positive_int, check_split, hash_splits
from ssl4ecg.eval.features import extract_features
from ssl4ecg.interfaces import EvalContext, Encoder, Evaluator


def cluster_scores(features: np.ndarray, labels: np.ndarray, metric: str = "euclidean") -> dict[str, float]:
    """Davies-Bouldin (lower is better), silhouette and Calinski-Harabasz of ``labels`` ``[N]``."""
    return {
        "davies_bouldin": float(davies_bouldin_score(features, labels)),
        "silhouette": float(silhouette_score(features, labels, metric=metric)),
        "calinski_harabasz": float(calinski_harabasz_score(features, labels)),
    }


class Clustering(Evaluator):
    """How well the embedding separates the true classes: DBI, silhouette and Calinski-Harabasz.

    Scores the single-label records of one split (``test`` by default) with their class as the
    cluster label; multi-label records are dropped and counted. ``pca = d`` first projects the
    features on their top ``d`` principal components (fitted on the scored split, without
    labels); ``standardize`` z-scores each feature first. Davies-Bouldin and Calinski-Harabasz
    are Euclidean by definition; ``metric`` sets the silhouette distance. With
    ``save_embeddings`` the raw features and labels are written to
    ``<run dir>/embeddings/clustering_<split>.npz`` for the t-SNE plot.
    """

    name = "clustering"

    def __init__(
        self,
        split: str = "test",
        pca: int = 0,
        standardize: bool = False,
        metric: str = "euclidean",
        save_embeddings: bool = True,
    ) -> None:
        n = self.name
        self.split = check_split(n, "split", split)
        self.pca = check_positive_int(n, "pca", pca, minimum=0)
        self.standardize = bool(standardize)
        self.metric = check_choice(n, "metric", metric, ("euclidean", "cosine", "manhattan"))
        self.save_embeddings = bool(save_embeddings)

    def protocol(self) -> dict[str, Any]:
        """Evaluator name and options."""
        return {"evaluator": self.name, "split": self.split, "pca": self.pca,
                "standardize": self.standardize, "metric": self.metric}

    def evaluate(self, encoder: Encoder, records, context: EvalContext) -> dict[str, Any]:
        """Cluster metrics of the true classes among the scored split's single-label records."""
        if not getattr(records, "is_labelled", False):
            raise ConfigError(f"evaluator '{self.name}' needs labelled data; the [data] source gives none.")
        idx = np.flatnonzero(np.asarray(records.splits) == self.split)
        y = np.asarray(records.labels)[idx] > 0.5
        single = y.sum(axis=1) == 1
        idx, labels = idx[single], np.argmax(y[single], axis=1)
        present = np.unique(labels)
        if len(present) < 2 or len(idx) <= len(present):
            raise ConfigError(
                f"evaluator '{self.name}': key 'split' = '{self.split}' has {len(idx)} single-label "
                f"records in {len(present)} classes; the metrics need at least 2 classes and more "
                f"records than classes."
            )
        raw = extract_features(encoder, records.subset(idx), context)
        x = raw.astype(np.float64)
        if self.standardize:
            std = x.std(axis=0)
            x = (x - x.mean(axis=0)) / np.where(std > 1e-8, std, 1.0)
        if self.pca:
            if self.pca > min(x.shape):
                raise ConfigError(
                    f"evaluator '{self.name}': key 'pca' = {self.pca} exceeds min(records, dims) = {min(x.shape)}."
                )
            x = PCA(n_components=self.pca, random_state=context.seed).fit_transform(x)
        out: dict[str, Any] = cluster_scores(x, labels, self.metric)
        names = list(records.class_names)
        out.update(
            n_records=int(len(idx)), n_clusters=int(len(present)),
            class_counts={names[c]: int((labels == c).sum()) for c in present},
            n_dropped_not_single_label=int((~single).sum()),
            headline=["davies_bouldin", "silhouette", "calinski_harabasz"],
            protocol={**self.protocol(), "classes": names,
                      "split_hash": hash_splits({self.split: np.asarray(records.record_ids)[idx]}),
                      "split_sizes": {self.split: int(len(idx))}},
        )
        if self.save_embeddings and context.out_dir is not None:
            path = Path(context.out_dir) / "embeddings" / f"clustering_{self.split}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, features=raw, labels=labels, class_names=np.array(names),
                                record_ids=np.asarray(records.record_ids)[idx])
            out["embeddings_file"] = str(path.relative_to(Path(context.out_dir)))
        return out
