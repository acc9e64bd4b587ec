"""Linear evaluation: one linear layer on frozen pooled features.

Two solvers fit the same model (a linear layer, sigmoid per class for multi-label tasks or softmax
for multi-class ones, on features standardised with train statistics):

* ``"lbfgs"`` (the default) minimises the L2-regularised cross-entropy to convergence with
  full-batch L-BFGS and picks the regularisation strength on validation (the CLIP-style probe). The
  result depends on the features only, not on how fast a few epochs of SGD happen to move.
* ``"adamw"`` is ECG-JEPA's protocol (AdamW, lr 5e-4, weight decay 0.05, batch 32, 3 warm-up
  epochs, cosine, 10 epochs; best epoch on validation). It is what the paper's numbers use, but it
  stops far from the optimum when the features are badly conditioned: on ptbxl-mini the features
  of a randomly initialised small CroPA ViT (1,536 dimensions, effective rank 55 after
  standardisation) probe at 0.51 test macro AUC with it and at 0.6-0.67 with a converged fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ssl4ecg.errors import ConfigError
from ssl4ecg.train.optim import cosine_lr
from ssl4ecg.eval.common import (
    BestOnValidation,
    Task,
    check_choice,
    check_float,
    check_float_list,
    check_positive_int,
    prepare_task,
    seeded,
)
from ssl4ecg.eval.features import extract_features
from ssl4ecg.eval.metrics import auc_macro, score_classification
from ssl4ecg.interfaces import EvalContext, Encoder, Evaluator


@dataclass
class ProbeFit:
    """A trained linear head with the standardisation and the choices made on val."""

    weight: np.ndarray  # [C, D]
    bias: np.ndarray  # [C]
    mean: np.ndarray  # [D] feature mean subtracted before the head (zeros without standardize)
    scale: np.ndarray  # [D] feature std the features are divided by (ones without standardize)
    multi_label: bool
    epoch: int  # adamw: 1-based epoch chosen on val; lbfgs: 0
    lr: float  # adamw: chosen learning rate; lbfgs: 0
    weight_decay: float  # adamw: chosen AdamW weight decay; lbfgs: 0
    val_auc_macro: float
    val_history: list[float] = field(default_factory=list)  # adamw: val AUC per epoch of the chosen lr/wd
    solver: str = "adamw"
    l2: float = 0.0  # lbfgs: chosen L2 strength
    iterations: int = 0  # lbfgs: L-BFGS iterations of the chosen fit
    val_by_l2: dict[str, float] = field(default_factory=dict)  # lbfgs: val AUC of every L2 strength

    def choice(self) -> dict[str, Any]:
        """What was chosen on validation, as reported in metrics.json."""
        if self.solver == "lbfgs":
            return {"l2": self.l2, "iterations": self.iterations, "val_auc_by_l2": dict(self.val_by_l2)}
        return {"epoch": self.epoch, "lr": self.lr, "weight_decay": self.weight_decay,
                "val_auc_history": list(self.val_history)}

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities ``[N, C]``: sigmoid (multi-label) or softmax (multi-class)."""
        z = (np.asarray(features, np.float64) - self.mean) / self.scale
        logits = torch.from_numpy(z @ self.weight.T.astype(np.float64) + self.bias)
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)
        return probs.numpy()


def _standardizer(x: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    if not standardize:
        return np.zeros(x.shape[1]), np.ones(x.shape[1])
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    return mean, np.where(std > 1e-8, std, 1.0)


def prior_bias(y_tr: torch.Tensor, n_classes: int, multi_label: bool) -> torch.Tensor:
    """Bias of the prior model: train log-odds per class (multi-label) or log class frequencies.

    Frequencies are smoothed by half a record so that absent classes get a finite bias.
    """
    n = y_tr.shape[0]
    if multi_label:
        pos = y_tr.sum(dim=0) + 0.5
        return torch.log(pos / (n + 1.0 - pos))
    counts = torch.bincount(y_tr, minlength=n_classes).double() + 0.5
    return torch.log(counts / counts.sum())


def _train_one(
    x_tr: torch.Tensor, y_tr: torch.Tensor, x_va: torch.Tensor, y_va: np.ndarray, multi_label: bool,
    epochs: int, lr: float, weight_decay: float, batch_size: int, warmup_epochs: int, seed: int,
    head_init: str = "zero",
) -> tuple[dict[str, torch.Tensor], int, float, list[float]]:
    """Train one head; return the state of the best val epoch, that epoch, its AUC and the history."""
    n, d = x_tr.shape
    n_classes = y_va.shape[1]
    with seeded(seed):
        head = nn.Linear(d, n_classes).double()
    if head_init in ("prior", "zero"):
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            if head_init == "prior":
                head.bias.copy_(prior_bias(y_tr, n_classes, multi_label))
    opt = torch.optim.AdamW(
        [{"params": [head.weight], "weight_decay": weight_decay},
         {"params": [head.bias], "weight_decay": 0.0}],
        lr=lr,
    )
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-n // batch_size)
    total = epochs * steps_per_epoch
    warmup = min(warmup_epochs, epochs) * steps_per_epoch
    best, history = BestOnValidation(), []
    step = 0
    for epoch in range(epochs):
        head.train()
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, lr, warmup_steps=warmup)
            logits = head(x_tr[idx])
            if multi_label:
                loss = F.binary_cross_entropy_with_logits(logits, y_tr[idx])
            else:
                loss = F.cross_entropy(logits, y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        with torch.no_grad():
            logits = head(x_va)
            probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)
        val_auc = auc_macro(y_va, probs.numpy())
        history.append(float(val_auc))
        best.update(val_auc, epoch + 1, head)
    return best.best_state(), best.epoch, best.score, history


def fit_probe(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
    multi_label: bool = True, standardize: bool = True, epochs: int = 10,
    lrs: tuple[float, ...] = (5e-4,), weight_decays: tuple[float, ...] = (0.05,),
    batch_size: int = 32, warmup_epochs: int = 3, seed: int = 0, head_init: str = "zero",
) -> ProbeFit:
    """Train a linear head on ``x_train`` and choose lr, weight decay and epoch by val macro AUC.

    ``y_*`` are ``[n, C]`` multi-hot (multi-label, BCE loss) or one-hot (multi-class, softmax
    cross-entropy) targets. AdamW (no decay on the bias), per-step linear warm-up over
    ``warmup_epochs`` then cosine decay to zero, mini-batches of ``batch_size`` shuffled by a
    generator seeded with ``seed``; the head is trained in float64 on the CPU (it is tiny), so
    results are reproducible. ``head_init="zero"`` starts from zero weights and bias (every
    probability 0.5), so the fit does not depend on a random start (the problem is convex);
    ``"prior"`` starts from zero weights and the prior model's bias (:func:`prior_bias`);
    ``"default"`` keeps PyTorch's ``nn.Linear`` initialisation (seeded). The head state of the epoch with the best val macro AUC is kept
    (the earliest one on ties); the test split is never seen here.
    """
    mean, scale = _standardizer(x_train, standardize)
    x_tr = torch.from_numpy((np.asarray(x_train, np.float64) - mean) / scale)
    x_va = torch.from_numpy((np.asarray(x_val, np.float64) - mean) / scale)
    if multi_label:
        y_tr = torch.from_numpy(np.asarray(y_train, np.float64))
    else:
        y_tr = torch.from_numpy(np.argmax(y_train, axis=1)).long()
    best: tuple | None = None
    for lr in lrs:
        for wd in weight_decays:
            state, epoch, val_auc, history = _train_one(
                x_tr, y_tr, x_va, np.asarray(y_val), multi_label, epochs, lr, wd, batch_size,
                warmup_epochs, seed, head_init,
            )
            if best is None or val_auc > best[2]:
                best = (state, epoch, val_auc, history, lr, wd)
    state, epoch, val_auc, history, lr, wd = best
    return ProbeFit(
        weight=state["weight"].numpy(), bias=state["bias"].numpy(), mean=mean, scale=scale,
        multi_label=multi_label, epoch=epoch, lr=float(lr), weight_decay=float(wd),
        val_auc_macro=float(val_auc), val_history=history,
    )


def _lbfgs_fit(x: torch.Tensor, y: torch.Tensor, multi_label: bool, n_classes: int, l2: float,
               max_iter: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Weights ``[C, D]``, bias ``[C]`` and iteration count of one converged L-BFGS fit."""
    weight = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        logits = x @ weight.T + bias
        if multi_label:
            data = F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / x.shape[0]
        else:
            data = F.cross_entropy(logits, y)
        loss = data + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    iterations = int(opt.state[weight].get("n_iter", 0))
    return weight.detach(), bias.detach(), iterations


def fit_logistic(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
    multi_label: bool = True, standardize: bool = True,
    l2_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0), max_iter: int = 1000,
) -> ProbeFit:
    """Converged L2-regularised logistic regression; the L2 strength chosen by val macro AUC.

    Minimises ``loss(features @ W.T + b) + l2 / 2 * ||W||^2`` (no penalty on the bias) from zero
    weights with full-batch L-BFGS in float64 (strong-Wolfe line search, at most ``max_iter``
    iterations), where ``loss`` is the per-record sum of per-class binary cross-entropies
    (multi-label; the classes decouple, so this is one-vs-rest logistic regression) or the softmax
    cross-entropy (multi-class), averaged over records. ``l2 = 1 / (C * n_train)`` in
    scikit-learn's terms. Deterministic: no random start, no mini-batches. Ties in val AUC
    (e.g. separable data) go to the lower val cross-entropy, then to the stronger regularisation.
    """
    mean, scale = _standardizer(x_train, standardize)
    x_tr = torch.from_numpy((np.asarray(x_train, np.float64) - mean) / scale)
    x_va = torch.from_numpy((np.asarray(x_val, np.float64) - mean) / scale)
    y_va = np.asarray(y_val)
    n_classes = y_va.shape[1]
    if multi_label:
        y_tr = torch.from_numpy(np.asarray(y_train, np.float64))
    else:
        y_tr = torch.from_numpy(np.argmax(y_train, axis=1)).long()
    best: tuple | None = None
    by_l2: dict[str, float] = {}
    for l2 in sorted(l2_grid, reverse=True):
        weight, bias, iterations = _lbfgs_fit(x_tr, y_tr, multi_label, n_classes, float(l2), max_iter)
        with torch.no_grad():
            logits = x_va @ weight.T + bias
            probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)
            target = torch.from_numpy(y_va.astype(np.float64))
            if multi_label:
                val_loss = float(F.binary_cross_entropy_with_logits(logits, target))
            else:
                val_loss = float(F.cross_entropy(logits, target.argmax(dim=1)))
        val_auc = float(auc_macro(y_va, probs.numpy()))
        by_l2[f"{l2:g}"] = val_auc
        key = (val_auc, -val_loss)
        if best is None or key > best[0]:
            best = (key, weight, bias, val_auc, float(l2), iterations)
    _, weight, bias, val_auc, l2, iterations = best
    return ProbeFit(
        weight=weight.numpy(), bias=bias.numpy(), mean=mean, scale=scale, multi_label=multi_label,
        epoch=0, lr=0.0, weight_decay=0.0, val_auc_macro=val_auc, solver="lbfgs", l2=l2,
        iterations=iterations, val_by_l2=by_l2,
    )


class LinearProbe(Evaluator):
    """Linear probe on frozen pooled features, its hyper-parameters chosen on val macro AUC.

    ``solver="lbfgs"`` (default) fits a converged L2-regularised logistic regression for every
    strength in ``l2_grid`` (:func:`fit_logistic`); ``solver="adamw"`` runs ECG-JEPA's linear
    evaluation (AdamW lr 5e-4, weight decay 0.05, batch 32, cosine schedule with 3 warm-up epochs,
    10 epochs; epoch and the optional lr/wd grids chosen on val, :func:`fit_probe`).
    ``multi_label=False`` keeps single-label records only and trains a softmax classifier
    (one-vs-rest AUC, argmax F1). Test macro AUC, macro F1 and per-class AUC are reported with
    percentile bootstrap intervals.
    """

    name = "linear_probe"

    def __init__(
        self,
        solver: str = "lbfgs",
        l2_grid: tuple = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
        max_iter: int = 1000,
        multi_label: bool = True,
        standardize: bool = True,
        epochs: int = 10,
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        batch_size: int = 32,
        warmup_epochs: int = 3,
        lr_grid: tuple = (),
        weight_decay_grid: tuple = (),
        head_init: str = "zero",
        threshold: float = 0.5,
        bootstrap: int = 1000,
        alpha: float = 0.05,
    ) -> None:
        n = self.name
        self.solver = check_choice(n, "solver", solver, ("lbfgs", "adamw"))
        self.l2_grid = check_float_list(n, "l2_grid", l2_grid, 0.0, 1e6, allow_empty=False)
        self.max_iter = check_positive_int(n, "max_iter", max_iter)
        self.head_init = check_choice(n, "head_init", head_init, ("zero", "prior", "default"))
        self.multi_label = bool(multi_label)
        self.standardize = bool(standardize)
        self.epochs = check_positive_int(n, "epochs", epochs)
        self.lr = check_float(n, "lr", lr, 0.0, 10.0, low_open=True)
        self.weight_decay = check_float(n, "weight_decay", weight_decay, 0.0, 10.0)
        self.batch_size = check_positive_int(n, "batch_size", batch_size)
        self.warmup_epochs = check_positive_int(n, "warmup_epochs", warmup_epochs, minimum=0)
        self.lr_grid = check_float_list(n, "lr_grid", lr_grid, 0.0, 10.0, low_open=True)
        self.weight_decay_grid = check_float_list(n, "weight_decay_grid", weight_decay_grid, 0.0, 10.0)
        self.threshold = check_float(n, "threshold", threshold, 0.0, 1.0)
        self.bootstrap = check_positive_int(n, "bootstrap", bootstrap, minimum=0)
        self.alpha = check_float(n, "alpha", alpha, 0.0, 0.5, low_open=True)

    def probe_options(self) -> dict[str, Any]:
        """The options that define how the head is trained and scored."""
        if self.solver == "lbfgs":
            fit = {"l2_grid": list(self.l2_grid), "max_iter": self.max_iter}
        else:
            fit = {
                "epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay,
                "batch_size": self.batch_size, "warmup_epochs": self.warmup_epochs,
                "lr_grid": list(self.lr_grid), "weight_decay_grid": list(self.weight_decay_grid),
                "head_init": self.head_init,
            }
        return {
            "solver": self.solver, "multi_label": self.multi_label, "standardize": self.standardize,
            **fit, "threshold": self.threshold, "bootstrap": self.bootstrap, "alpha": self.alpha,
            "selection": "val auc_macro",
        }

    def protocol(self) -> dict[str, Any]:
        """Evaluator name and options (the task part is added by :meth:`evaluate`)."""
        return {"evaluator": self.name, **self.probe_options()}

    def fit(self, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
            seed: int) -> ProbeFit:
        """Train the head with this evaluator's options (:func:`fit_logistic` or :func:`fit_probe`)."""
        if self.solver == "lbfgs":
            return fit_logistic(x_train, y_train, x_val, y_val, multi_label=self.multi_label,
                                standardize=self.standardize, l2_grid=self.l2_grid, max_iter=self.max_iter)
        return fit_probe(
            x_train, y_train, x_val, y_val, multi_label=self.multi_label,
            standardize=self.standardize, epochs=self.epochs,
            lrs=self.lr_grid or (self.lr,), weight_decays=self.weight_decay_grid or (self.weight_decay,),
            batch_size=self.batch_size, warmup_epochs=self.warmup_epochs, seed=seed,
            head_init=self.head_init,
        )

    def score_features(self, task: Task, feats: dict[str, np.ndarray], seed: int,
                       bootstrap: int | None = None, train_rows: np.ndarray | None = None) -> dict[str, Any]:
        """Fit on ``feats["train"]`` (rows ``train_rows`` only, if given), choose on val, score test."""
        x_tr, y_tr = feats["train"], task.targets["train"]
        if train_rows is not None:
            x_tr, y_tr = x_tr[train_rows], y_tr[train_rows]
        fit = self.fit(x_tr, y_tr, feats["val"], task.targets["val"], seed)
        scores = fit.predict(feats["test"])
        out = score_classification(
            task.targets["test"], scores, task.class_names, multi_label=self.multi_label,
            threshold=self.threshold, n_resamples=self.bootstrap if bootstrap is None else bootstrap,
            seed=seed, alpha=self.alpha,
        )
        out.update(val_auc_macro=fit.val_auc_macro, **fit.choice(), n_train=int(len(x_tr)))
        return out

    def evaluate(self, encoder: Encoder, records, context: EvalContext) -> dict[str, Any]:
        """Extract frozen features of train/val/test, fit the head, score test once."""
        task = prepare_task(records, self.multi_label, self.name)
        feats = {s: extract_features(encoder, records.subset(task.index[s]), context) for s in task.index}
        out = self.score_features(task, feats, context.seed)
        out["headline"] = ["auc_macro", "f1_macro"]
        out["protocol"] = {**self.protocol(), **task.protocol()}
        if not self.multi_label:
            out["n_dropped_not_single_label"] = dict(task.dropped)
        return out
