"""The ``hybrid_probe`` evaluator: frozen embedding + clinical features through a learned fusion."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ssl4ecg.clinical import FEATURE_NAMES, features_for
from ssl4ecg.clinical.features import VERSION as CLINICAL_VERSION
from ssl4ecg.errors import ConfigError
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
from ssl4ecg.eval.metrics import auc_macro, score_classification
from ssl4ecg.interfaces import EvalContext, Encoder, Evaluator

from ssl4ecg_hybrid.fusion import FUSIONS, ClinicalPreprocessor, FusionHead

BRANCHES = ("hybrid", "embedding", "clinical")


def _standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Every array standardised with the train mean and std (float32)."""
    mean = train.mean(axis=0, dtype=np.float64)
    std = train.std(axis=0, dtype=np.float64)
    std = np.where(std > 1e-8, std, 1.0)
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def train_fusion_head(
    inputs: dict[str, tuple[np.ndarray | None, np.ndarray | None]],
    targets: dict[str, np.ndarray],
    *,
    multi_label: bool,
    fusion: str,
    hidden: int,
    dropout: float,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    warmup_epochs: int,
    seed: int,
) -> tuple[FusionHead, int, float, list[float]]:
    """Train a :class:`FusionHead` on ``inputs["train"]``; keep the epoch with the best val macro AUC.

    ``inputs[split] = (embedding or None, clinical or None)``. Returns the head (best state,
    eval mode), the 1-based chosen epoch, its val AUC and the val AUC history.
    """
    emb_tr, clin_tr = inputs["train"]
    y_tr = targets["train"]
    n = len(y_tr)
    d_e = 0 if emb_tr is None else emb_tr.shape[1]
    d_c = 0 if clin_tr is None else clin_tr.shape[1]
    with seeded(seed):
        head = FusionHead(d_e, d_c, y_tr.shape[1], hidden=hidden, fusion=fusion, dropout=dropout)
    decay = [p for name, p in head.named_parameters() if p.ndim > 1]
    no_decay = [p for name, p in head.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    tensor = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    e_tr, c_tr = tensor(emb_tr), tensor(clin_tr)
    e_va, c_va = (tensor(a) for a in inputs["val"])
    y_t = torch.from_numpy(y_tr.astype(np.float32)) if multi_label else \
        torch.from_numpy(np.argmax(y_tr, axis=1)).long()
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-n // batch_size)
    total = epochs * steps_per_epoch
    warmup = min(warmup_epochs, epochs) * steps_per_epoch
    best, history, step = BestOnValidation(), [], 0
    for epoch in range(epochs):
        head.train()
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, lr, warmup_steps=warmup)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + step)  # dropout masks, reproducible
                logits = head(None if e_tr is None else e_tr[idx], None if c_tr is None else c_tr[idx])
            loss = F.binary_cross_entropy_with_logits(logits, y_t[idx]) if multi_label else \
                F.cross_entropy(logits, y_t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        head.eval()
        with torch.no_grad():
            logits = head(e_va, c_va)
            probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)
        val_auc = auc_macro(targets["val"], probs.numpy())
        history.append(float(val_auc))
        best.update(val_auc, epoch + 1, head)
    head.load_state_dict(best.best_state())
    head.eval()
    return head, best.epoch, best.score, history


def predict(head: FusionHead, emb: np.ndarray | None, clin: np.ndarray | None, multi_label: bool) -> np.ndarray:
    """Class probabilities of a trained head."""
    t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    with torch.no_grad():
        logits = head(t(emb), t(clin))
    return (torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)).numpy()


class HybridProbe(Evaluator):
    """Frozen-encoder embedding fused with clinical ECG features; trained on train, chosen on val.

    The clinical features (:mod:`ssl4ecg.clinical`: heart rate, HRV, PR, QRS, QT/QTc, axis,
    ST levels, voltage criteria) are measured once per dataset and cached on disk
    (``cache_dir``, default ``$SSL4ECG_CACHE_DIR/clinical``). Missing features get indicator
    columns and the train median; both branches are standardised on train, LayerNorm-ed and
    fused (``fusion = "gated"`` or ``"concat"``) into an MLP head trained with AdamW and a
    cosine schedule; the epoch with the best val macro AUC is kept and test is scored once.
    ``features`` restricts the clinical columns (default: all). With ``ablation`` the same
    head is also trained on the embedding alone and on the clinical features alone, so one
    run shows what the fusion adds.
    """

    name = "hybrid_probe"

    def __init__(
        self,
        multi_label: bool = True,
        fusion: str = "gated",
        hidden: int = 128,
        dropout: float = 0.1,
        epochs: int = 30,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        batch_size: int = 64,
        warmup_epochs: int = 2,
        features: tuple = (),
        missing_indicators: bool = True,
        ablation: bool = True,
        cache_dir: str = "",
        workers: int = 1,
        threshold: float = 0.5,
        bootstrap: int = 1000,
        alpha: float = 0.05,
    ) -> None:
        n = self.name
        self.multi_label = bool(multi_label)
        self.fusion = check_choice(n, "fusion", fusion, FUSIONS)
        self.hidden = check_positive_int(n, "hidden", hidden)
        self.dropout = check_float(n, "dropout", dropout, 0.0, 0.9)
        self.epochs = check_positive_int(n, "epochs", epochs)
        self.lr = check_float(n, "lr", lr, 0.0, 10.0, low_open=True)
        self.weight_decay = check_float(n, "weight_decay", weight_decay, 0.0, 10.0)
        self.batch_size = check_positive_int(n, "batch_size", batch_size)
        self.warmup_epochs = check_positive_int(n, "warmup_epochs", warmup_epochs, minimum=0)
        if not isinstance(features, (list, tuple)):
            raise ConfigError(f"evaluator '{n}': key 'features' must be a list of feature names, got {features!r}.")
        unknown = [f for f in features if f not in FEATURE_NAMES]
        if unknown:
            raise ConfigError(f"evaluator '{n}': key 'features' names unknown features {unknown}; "
                              f"valid: {list(FEATURE_NAMES)}.")
        self.features = tuple(features) or tuple(FEATURE_NAMES)
        self.missing_indicators = bool(missing_indicators)
        self.ablation = bool(ablation)
        self.cache_dir = str(cache_dir)
        self.workers = check_positive_int(n, "workers", workers)
        self.threshold = check_float(n, "threshold", threshold, 0.0, 1.0)
        self.bootstrap = check_positive_int(n, "bootstrap", bootstrap, minimum=0)
        self.alpha = check_float(n, "alpha", alpha, 0.0, 0.5, low_open=True)

    def protocol(self) -> dict[str, Any]:
        """Evaluator name, options and the clinical feature set (the task part is added later)."""
        return {
            "evaluator": self.name, "multi_label": self.multi_label, "fusion": self.fusion,
            "hidden": self.hidden, "dropout": self.dropout, "epochs": self.epochs, "lr": self.lr,
            "weight_decay": self.weight_decay, "batch_size": self.batch_size,
            "warmup_epochs": self.warmup_epochs, "features": list(self.features),
            "missing_indicators": self.missing_indicators, "threshold": self.threshold,
            "bootstrap": self.bootstrap, "alpha": self.alpha, "clinical_version": CLINICAL_VERSION,
            "selection": "val auc_macro (epoch)",
        }

    def clinical_features(self, records) -> np.ndarray:
        """The selected clinical feature columns of every record (cached, NaN = missing)."""
        feats, names = features_for(records, cache_dir=self.cache_dir or None, workers=self.workers)
        cols = [names.index(f) for f in self.features]
        return feats[:, cols]

    def _fit_score(self, task, emb: dict[str, np.ndarray] | None, clin: dict[str, np.ndarray] | None,
                   seed: int, bootstrap: int) -> dict[str, Any]:
        inputs = {s: (None if emb is None else emb[s], None if clin is None else clin[s]) for s in task.index}
        head, epoch, val_auc, history = train_fusion_head(
            inputs, task.targets, multi_label=self.multi_label, fusion=self.fusion,
            hidden=self.hidden, dropout=self.dropout, epochs=self.epochs, lr=self.lr,
            weight_decay=self.weight_decay, batch_size=self.batch_size,
            warmup_epochs=self.warmup_epochs, seed=seed,
        )
        scores = predict(head, *inputs["test"], multi_label=self.multi_label)
        out = score_classification(
            task.targets["test"], scores, task.class_names, multi_label=self.multi_label,
            threshold=self.threshold, n_resamples=bootstrap, seed=seed, alpha=self.alpha,
        )
        out.update(val_auc_macro=float(val_auc), epoch=int(epoch), val_auc_history=history)
        return out

    def evaluate(self, encoder: Encoder, records, context: EvalContext) -> dict[str, Any]:
        """Embed and measure every split, fit the fusion head, choose on val, score test once."""
        task = prepare_task(records, self.multi_label, self.name)
        raw_clin = self.clinical_features(records)
        clin_raw = {s: raw_clin[task.index[s]] for s in task.index}
        pre = ClinicalPreprocessor.fit(clin_raw["train"], self.features, self.missing_indicators)
        clin = {s: pre.transform(clin_raw[s], self.features) for s in task.index}
        if clin["train"].shape[1] == 0:
            raise ConfigError(f"evaluator '{self.name}': no clinical feature could be measured on train.")
        emb_raw = {s: extract_features(encoder, records.subset(task.index[s]), context) for s in task.index}
        e_tr, e_va, e_te = _standardize(emb_raw["train"], emb_raw["val"], emb_raw["test"])
        emb = {"train": e_tr, "val": e_va, "test": e_te}

        out = self._fit_score(task, emb, clin, context.seed, self.bootstrap)
        out["missing_rate"] = {
            s: {f: float(np.isnan(clin_raw[s][:, j]).mean()) for j, f in enumerate(self.features)}
            for s in task.index
        }
        out["clinical_inputs"] = pre.output_names()
        if self.ablation:
            out["ablation"] = {}
            for branch, e, c in (("embedding_only", emb, None), ("clinical_only", None, clin)):
                part = self._fit_score(task, e, c, context.seed, bootstrap=0)
                out["ablation"][branch] = {k: part[k] for k in ("auc_macro", "f1_macro", "auc_per_class",
                                                                "f1_per_class", "val_auc_macro", "epoch")}
        out["headline"] = ["auc_macro", "f1_macro"]
        out["protocol"] = {**self.protocol(), **task.protocol()}
        if not self.multi_label:
            out["n_dropped_not_single_label"] = dict(task.dropped)
        return out


__all__: Sequence[str] = ("HybridProbe", "predict", "train_fusion_head")
