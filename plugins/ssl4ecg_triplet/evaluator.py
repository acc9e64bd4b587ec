"""The ``triplet_probe`` evaluator: triplet-loss fine-tuning of a head on a frozen encoder."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors
from torch import nn
from torch.nn import functional as F

from ssl4ecg.errors import ConfigError
from ssl4ecg.eval.clustering import cluster_scores
from ssl4ecg.train.optim import cosine_lr
from ssl4ecg.eval.common import (
    BestOnValidation,
    check_choice,
    check_float,
    check_positive_int,
    prepare_task,
    seeded,
)
from ssl4ecg.eval.features import extract_features
from ssl4ecg.eval.knn import neighbour_scores
from ssl4ecg.eval.metrics import auc_macro, score_classification
from ssl4ecg.interfaces import EvalContext, Encoder, Evaluator

from ssl4ecg_triplet.mining import triplet_loss

MININGS = ("batch_hard", "semi_hard")
SELECTIONS = ("auc", "knn_auc")


class TripletHead(nn.Module):
    """``embedding -> fc1: Linear(D, embed_dim) -> ReLU -> fc2: Linear(embed_dim, classes)`` (the report's head).

    The triplet loss works on ``z = fc1(x)``, L2-normalised when ``normalize``; the classifier
    reads ``relu(fc1(x))`` (detached when ``detach_classifier``, so that only the triplet loss
    shapes ``fc1``).
    """

    def __init__(self, in_dim: int, n_classes: int, embed_dim: int = 64, normalize: bool = True,
                 detach_classifier: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, embed_dim)
        self.fc2 = nn.Linear(embed_dim, n_classes)
        self.normalize = normalize
        self.detach_classifier = detach_classifier

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The metric embedding ``z`` ``[B, embed_dim]``."""
        h = self.fc1(x)
        return F.normalize(h, dim=1) if self.normalize else h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, logits)``."""
        h = self.fc1(x)
        z = F.normalize(h, dim=1) if self.normalize else h
        return z, self.fc2(F.relu(h.detach() if self.detach_classifier else h))


def label_set_batches(labels: np.ndarray, groups_per_batch: int, per_group: int,
                      generator: torch.Generator) -> list[np.ndarray]:
    """One epoch of P x K batches: ``groups_per_batch`` label sets, ``per_group`` records each.

    Records are grouped by their exact label set; every group with at least two records is
    drawn (with replacement inside small groups) so that each batch holds positives for its
    anchors. The epoch has about ``len(labels) / (P * K)`` batches.
    """
    keys = [tuple(np.flatnonzero(row > 0.5)) for row in labels]
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    usable = [np.asarray(v) for v in groups.values() if len(v) >= 2]
    if len(usable) < 2:
        raise ConfigError("triplet_probe: train needs at least two label sets with two records each.")
    sizes = np.array([len(g) for g in usable], dtype=np.float64)
    weight = torch.from_numpy(np.sqrt(sizes) / np.sqrt(sizes).sum())
    p = min(groups_per_batch, len(usable))
    n_batches = max(1, len(labels) // (p * per_group))
    out = []
    for _ in range(n_batches):
        chosen = torch.multinomial(weight, p, replacement=False, generator=generator).numpy()
        idx = []
        for g in chosen:
            members = usable[g]
            replace = len(members) < per_group
            pick = torch.randint(0, len(members), (per_group,), generator=generator) if replace else \
                torch.randperm(len(members), generator=generator)[:per_group]
            idx.append(members[pick.numpy()])
        out.append(np.concatenate(idx))
    return out


def knn_scores(z_train: np.ndarray, y_train: np.ndarray, z_query: np.ndarray, k: int,
               multi_label: bool, metric: str = "cosine") -> np.ndarray:
    """Neighbour label fractions of ``z_query`` among ``z_train`` (the core ``knn`` rule)."""
    index = NearestNeighbors(n_neighbors=k, metric=metric, algorithm="brute").fit(z_train)
    neigh = index.kneighbors(z_query, return_distance=False)
    return neighbour_scores(y_train, neigh, k, multi_label)


def single_label_clusters(z: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Clustering metrics of the single-label records of ``y`` (their class = cluster)."""
    single = (y > 0.5).sum(axis=1) == 1
    labels = np.argmax(y[single], axis=1)
    if len(np.unique(labels)) < 2 or single.sum() <= len(np.unique(labels)):
        return {"davies_bouldin": float("nan"), "silhouette": float("nan"),
                "calinski_harabasz": float("nan"), "n_records": int(single.sum())}
    out: dict[str, Any] = cluster_scores(z[single].astype(np.float64), labels)
    out["n_records"] = int(single.sum())
    return out


class TripletProbe(Evaluator):
    """Triplet-loss fine-tuning of ``Linear(D, 64) -> Linear(64, classes)`` on frozen embeddings.

    Batches are P x K label-set batches; triplets are mined ``batch_hard`` (default) or
    ``semi_hard`` with the multi-label rule of :mod:`ssl4ecg_triplet.mining` (positives:
    Jaccard >= ``pos_jaccard``, negatives: Jaccard <= ``neg_jaccard``). The loss is
    ``triplet + ce_weight * BCE``; with ``ce_weight = 0`` the classifier still learns, from the
    detached embedding. The epoch is chosen on val (``select_by``: head macro AUC or kNN
    macro AUC of the 64-d embedding); test then reports the head's AUC/F1, the embedding's kNN
    AUC/F1 (neighbours among train, ``k`` chosen on val from ``k_grid``) and the clustering
    metrics of its single-label records -- and, with ``baseline``, the same kNN and
    clustering metrics of the frozen embedding itself.
    """

    name = "triplet_probe"

    def __init__(
        self,
        multi_label: bool = True,
        embed_dim: int = 64,
        margin: float = 0.2,
        mining: str = "batch_hard",
        pos_jaccard: float = 1.0,
        neg_jaccard: float = 0.0,
        normalize: bool = True,
        ce_weight: float = 1.0,
        epochs: int = 30,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        groups_per_batch: int = 8,
        per_group: int = 8,
        warmup_epochs: int = 2,
        select_by: str = "auc",
        k_grid: tuple = (5, 10, 20),
        baseline: bool = True,
        threshold: float = 0.5,
        bootstrap: int = 1000,
        alpha: float = 0.05,
    ) -> None:
        n = self.name
        self.multi_label = bool(multi_label)
        self.embed_dim = check_positive_int(n, "embed_dim", embed_dim)
        self.margin = check_float(n, "margin", margin, 0.0, 10.0)
        self.mining = check_choice(n, "mining", mining, MININGS)
        self.pos_jaccard = check_float(n, "pos_jaccard", pos_jaccard, 0.0, 1.0, low_open=True)
        self.neg_jaccard = check_float(n, "neg_jaccard", neg_jaccard, 0.0, 1.0)
        if self.neg_jaccard >= self.pos_jaccard:
            raise ConfigError(f"evaluator '{n}': 'neg_jaccard' ({neg_jaccard}) must be below 'pos_jaccard' ({pos_jaccard}).")
        self.normalize = bool(normalize)
        self.ce_weight = check_float(n, "ce_weight", ce_weight, 0.0, 100.0)
        self.epochs = check_positive_int(n, "epochs", epochs)
        self.lr = check_float(n, "lr", lr, 0.0, 10.0, low_open=True)
        self.weight_decay = check_float(n, "weight_decay", weight_decay, 0.0, 10.0)
        self.groups_per_batch = check_positive_int(n, "groups_per_batch", groups_per_batch, minimum=2)
        self.per_group = check_positive_int(n, "per_group", per_group, minimum=2)
        self.warmup_epochs = check_positive_int(n, "warmup_epochs", warmup_epochs, minimum=0)
        self.select_by = check_choice(n, "select_by", select_by, SELECTIONS)
        if not isinstance(k_grid, (list, tuple)) or not k_grid:
            raise ConfigError(f"evaluator '{n}': key 'k_grid' must be a non-empty list of integers, got {k_grid!r}.")
        self.k_grid = tuple(check_positive_int(n, "k_grid", k) for k in k_grid)
        self.baseline = bool(baseline)
        self.threshold = check_float(n, "threshold", threshold, 0.0, 1.0)
        self.bootstrap = check_positive_int(n, "bootstrap", bootstrap, minimum=0)
        self.alpha = check_float(n, "alpha", alpha, 0.0, 0.5, low_open=True)

    def protocol(self) -> dict[str, Any]:
        """Evaluator name and options (the task part is added by :meth:`evaluate`)."""
        return {
            "evaluator": self.name, "multi_label": self.multi_label, "embed_dim": self.embed_dim,
            "margin": self.margin, "mining": self.mining, "pos_jaccard": self.pos_jaccard,
            "neg_jaccard": self.neg_jaccard, "normalize": self.normalize, "ce_weight": self.ce_weight,
            "epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay,
            "groups_per_batch": self.groups_per_batch, "per_group": self.per_group,
            "warmup_epochs": self.warmup_epochs, "select_by": f"val {self.select_by} (epoch)",
            "k_grid": list(self.k_grid), "threshold": self.threshold, "bootstrap": self.bootstrap,
            "alpha": self.alpha,
        }

    # ------------------------------------------------------------------ training

    def _knn_val(self, z_tr: np.ndarray, y_tr: np.ndarray, z_va: np.ndarray, y_va: np.ndarray) -> tuple[int, float]:
        """The k of ``k_grid`` with the best val macro AUC, and that AUC."""
        best_k, best = self.k_grid[0], -np.inf
        for k in self.k_grid:
            if k > len(z_tr):
                continue
            auc = auc_macro(y_va, knn_scores(z_tr, y_tr, z_va, k, self.multi_label))
            if np.isfinite(auc) and auc > best:
                best_k, best = k, float(auc)
        return best_k, best

    def fit(self, x: dict[str, np.ndarray], y: dict[str, np.ndarray], seed: int) -> tuple[TripletHead, dict[str, Any]]:
        """Train the head on ``x["train"]``; return it at the best val epoch with the training record."""
        n_classes = y["train"].shape[1]
        with seeded(seed):
            head = TripletHead(x["train"].shape[1], n_classes, self.embed_dim, self.normalize,
                               detach_classifier=self.ce_weight == 0.0)
        params = [{"params": [p for p in head.parameters() if p.ndim > 1], "weight_decay": self.weight_decay},
                  {"params": [p for p in head.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(params, lr=self.lr)
        gen = torch.Generator().manual_seed(seed)
        x_tr = torch.from_numpy(x["train"])
        x_va = torch.from_numpy(x["val"])
        y_tr = torch.from_numpy(y["train"].astype(np.float32))
        y_tr_idx = torch.from_numpy(np.argmax(y["train"], axis=1)).long()
        steps_per_epoch = len(label_set_batches(y["train"], self.groups_per_batch, self.per_group,
                                                torch.Generator().manual_seed(seed)))
        total = self.epochs * steps_per_epoch
        warmup = min(self.warmup_epochs, self.epochs) * steps_per_epoch
        best, history, step = BestOnValidation(), [], 0
        last_logs: dict[str, float] = {}
        for epoch in range(self.epochs):
            head.train()
            tl, cl, act = [], [], []
            for idx in label_set_batches(y["train"], self.groups_per_batch, self.per_group, gen):
                idx_t = torch.from_numpy(idx)
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(step, total, self.lr, warmup_steps=warmup)
                z, logits = head(x_tr[idx_t])
                t_loss, t_logs = triplet_loss(z, y_tr[idx_t], self.margin, self.mining,
                                              self.pos_jaccard, self.neg_jaccard)
                c_loss = F.binary_cross_entropy_with_logits(logits, y_tr[idx_t]) if self.multi_label \
                    else F.cross_entropy(logits, y_tr_idx[idx_t])
                loss = t_loss + (self.ce_weight if self.ce_weight > 0 else 1.0) * c_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                tl.append(float(t_loss.detach()))
                cl.append(float(c_loss.detach()))
                act.append(t_logs["active"])
            head.eval()
            with torch.no_grad():
                z_tr = head.embed(x_tr).numpy()
                z_va, logits = head(x_va)
                probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)
            val_auc = auc_macro(y["val"], probs.numpy())
            k, val_knn = self._knn_val(z_tr, y["train"], z_va.numpy(), y["val"])
            score = val_auc if self.select_by == "auc" else val_knn
            last_logs = {"triplet_loss": float(np.mean(tl)), "ce_loss": float(np.mean(cl)),
                         "active_triplets": float(np.mean(act))}
            history.append({"epoch": epoch + 1, "val_auc_macro": float(val_auc),
                            "val_knn_auc_macro": float(val_knn), "k": int(k), **last_logs})
            best.update(score, epoch + 1, head)
        head.load_state_dict(best.best_state())
        head.eval()
        return head, {"epoch": best.epoch, "history": history}

    # ------------------------------------------------------------------ evaluation

    def _embedding_metrics(self, z: dict[str, np.ndarray], task, seed: int, bootstrap: int) -> dict[str, Any]:
        """kNN (k chosen on val) and clustering metrics of an embedding on test."""
        k, val_auc = self._knn_val(z["train"], task.targets["train"], z["val"], task.targets["val"])
        scores = knn_scores(z["train"], task.targets["train"], z["test"], k, self.multi_label)
        knn = score_classification(task.targets["test"], scores, task.class_names, multi_label=self.multi_label,
                                   threshold=self.threshold, n_resamples=bootstrap, seed=seed, alpha=self.alpha)
        out = {f"knn_{key}": v for key, v in knn.items() if key in
               ("auc_macro", "f1_macro", "auc_per_class", "auc_macro_ci", "f1_macro_ci")}
        out.update(knn_k=int(k), knn_val_auc_macro=float(val_auc))
        clusters = single_label_clusters(z["test"], task.targets["test"])
        out.update({key: clusters[key] for key in ("davies_bouldin", "silhouette", "calinski_harabasz")})
        out["n_cluster_records"] = clusters["n_records"]
        return out

    def evaluate(self, encoder: Encoder, records, context: EvalContext) -> dict[str, Any]:
        """Embed the splits (frozen), train the head, choose on val, score test once."""
        task = prepare_task(records, self.multi_label, self.name)
        raw = {s: extract_features(encoder, records.subset(task.index[s]), context) for s in task.index}
        mean = raw["train"].mean(axis=0, dtype=np.float64)
        std = raw["train"].std(axis=0, dtype=np.float64)
        std = np.where(std > 1e-8, std, 1.0)
        x = {s: ((v - mean) / std).astype(np.float32) for s, v in raw.items()}
        head, record = self.fit(x, task.targets, context.seed)
        with torch.no_grad():
            z = {s: head.embed(torch.from_numpy(v)).numpy() for s, v in x.items()}
            logits = head(torch.from_numpy(x["test"]))[1]
            probs = (torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)).numpy()
        out = score_classification(task.targets["test"], probs, task.class_names, multi_label=self.multi_label,
                                   threshold=self.threshold, n_resamples=self.bootstrap, seed=context.seed,
                                   alpha=self.alpha)
        out.update(self._embedding_metrics(z, task, context.seed, self.bootstrap))
        out.update(epoch=record["epoch"], history=record["history"])
        if self.baseline:
            out["baseline"] = self._embedding_metrics(x, task, context.seed, 0)
        out["headline"] = ["auc_macro", "f1_macro", "knn_auc_macro", "davies_bouldin"]
        out["protocol"] = {**self.protocol(), **task.protocol()}
        if not self.multi_label:
            out["n_dropped_not_single_label"] = dict(task.dropped)
        return out
