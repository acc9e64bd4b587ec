"""End-to-end fine-tuning (encoder + linear head) and the supervised-from-scratch baseline."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ssl4ecg.errors import ConfigError
from ssl4ecg.train.optim import cosine_lr
from ssl4ecg.eval.common import (
    BestOnValidation,
    check_float,
    check_positive_int,
    prepare_task,
    seeded,
)
from ssl4ecg.eval.features import autocast, encoder_leads, eval_mode, iter_signal_batches, lead_rows
from ssl4ecg.eval.metrics import auc_macro, score_classification
from ssl4ecg.interfaces import EvalContext, Encoder, Evaluator


def reinitialise(module: nn.Module, seed: int) -> dict[str, int]:
    """Re-initialise ``module`` in place, as if freshly built: the supervised-from-scratch start.

    Every submodule with ``reset_parameters`` (or ``_reset_parameters``, e.g. multi-head
    attention) calls it, children before parents so that a parent's own custom initialisation
    wins. Parameters owned by modules without such a method (learnable tokens, positional or lead
    embeddings) are drawn from a normal distribution with std 0.02 truncated at +-2 std (the ViT
    convention). Returns counts of reset modules and re-drawn parameters.
    """
    covered: set[int] = set()
    n_modules = 0
    with seeded(seed), torch.no_grad():
        for sub in reversed(list(module.modules())):
            reset = getattr(sub, "reset_parameters", None) or getattr(sub, "_reset_parameters", None)
            if callable(reset):
                reset()
                n_modules += 1
                covered.update(id(p) for p in sub.parameters())
        n_params = 0
        for p in module.parameters():
            if id(p) not in covered:
                nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)
                n_params += 1
    return {"modules_reset": n_modules, "parameters_redrawn": n_params}


def layer_ids(encoder: nn.Module) -> tuple[dict[str, int], int]:
    """Layer id of every parameter for layer-wise lr decay, and the number of layers + 1.

    The encoder's largest ``nn.ModuleList`` whose name ends in ``blocks`` or ``layers`` gives the
    depth; a parameter inside block ``i`` gets id ``i + 1``, parameters registered before the
    blocks (embeddings) get 0 and those after them (final norm) ``depth + 1``.
    """
    candidates = [
        (name, m) for name, m in encoder.named_modules()
        if isinstance(m, nn.ModuleList) and name.split(".")[-1].endswith(("blocks", "layers"))
    ]
    if not candidates:
        raise ConfigError(
            f"evaluator 'finetune': key 'layer_decay' < 1 needs an encoder with an nn.ModuleList "
            f"named '...blocks' or '...layers'; {type(encoder).__name__} has none. Set layer_decay = 1.0."
        )
    name, blocks = max(candidates, key=lambda c: len(c[1]))
    depth = len(blocks)
    ids: dict[str, int] = {}
    seen_blocks = False
    prefix = name + "."
    for pname, _ in encoder.named_parameters():
        if pname.startswith(prefix):
            ids[pname] = int(pname[len(prefix):].split(".")[0]) + 1
            seen_blocks = True
        else:
            ids[pname] = depth + 1 if seen_blocks else 0
    return ids, depth + 1


class _Classifier(nn.Module):
    def __init__(self, encoder: Encoder, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.embed_dim), n_classes)

    def forward(self, x: torch.Tensor, leads) -> torch.Tensor:
        """Logits ``[B, C]`` of the head on the pooled embedding."""
        return self.head(self.encoder.embed(x, leads=leads).float())


class Finetune(Evaluator):
    """Fine-tune a deep copy of the encoder with a linear head; choose the epoch on val macro AUC.

    The effective learning rate is ``base_lr * batch_size / 256`` (ECG-JEPA: base 1e-4), AdamW
    with ``weight_decay`` (none on biases and 1-D parameters), linear warm-up then cosine decay,
    optional layer-wise lr decay. ``from_scratch=True`` re-initialises the copy first: the
    supervised-from-scratch baseline. The caller's encoder is never modified.
    """

    name = "finetune"

    def __init__(
        self,
        multi_label: bool = True,
        epochs: int = 10,
        base_lr: float = 1e-4,
        batch_size: int = 32,
        weight_decay: float = 0.05,
        warmup_epochs: int = 1,
        layer_decay: float = 1.0,
        head_lr_scale: float = 1.0,
        patience: int = 0,
        from_scratch: bool = False,
        max_steps_per_epoch: int = 0,
        threshold: float = 0.5,
        bootstrap: int = 1000,
        alpha: float = 0.05,
    ) -> None:
        n = self.name
        self.multi_label = bool(multi_label)
        self.epochs = check_positive_int(n, "epochs", epochs)
        self.base_lr = check_float(n, "base_lr", base_lr, 0.0, 10.0, low_open=True)
        self.batch_size = check_positive_int(n, "batch_size", batch_size)
        self.weight_decay = check_float(n, "weight_decay", weight_decay, 0.0, 10.0)
        self.warmup_epochs = check_positive_int(n, "warmup_epochs", warmup_epochs, minimum=0)
        self.layer_decay = check_float(n, "layer_decay", layer_decay, 0.0, 1.0, low_open=True)
        self.head_lr_scale = check_float(n, "head_lr_scale", head_lr_scale, 0.0, 1000.0, low_open=True)
        self.patience = check_positive_int(n, "patience", patience, minimum=0)
        self.from_scratch = bool(from_scratch)
        self.max_steps_per_epoch = check_positive_int(n, "max_steps_per_epoch", max_steps_per_epoch, minimum=0)
        self.threshold = check_float(n, "threshold", threshold, 0.0, 1.0)
        self.bootstrap = check_positive_int(n, "bootstrap", bootstrap, minimum=0)
        self.alpha = check_float(n, "alpha", alpha, 0.0, 0.5, low_open=True)

    @property
    def lr(self) -> float:
        """The effective peak learning rate ``base_lr * batch_size / 256``."""
        return self.base_lr * self.batch_size / 256

    def protocol(self) -> dict[str, Any]:
        """Evaluator name and the options that define the training."""
        return {
            "evaluator": self.name, "multi_label": self.multi_label, "epochs": self.epochs,
            "base_lr": self.base_lr, "batch_size": self.batch_size, "weight_decay": self.weight_decay,
            "warmup_epochs": self.warmup_epochs, "layer_decay": self.layer_decay,
            "head_lr_scale": self.head_lr_scale, "patience": self.patience,
            "from_scratch": self.from_scratch, "max_steps_per_epoch": self.max_steps_per_epoch,
            "threshold": self.threshold, "bootstrap": self.bootstrap, "alpha": self.alpha,
            "selection": "val auc_macro",
        }

    def _param_groups(self, model: _Classifier) -> list[dict[str, Any]]:
        if self.layer_decay < 1.0:
            ids, n_layers = layer_ids(model.encoder)
        else:
            ids, n_layers = {}, 0
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for pname, p in model.encoder.named_parameters():
            if not p.requires_grad:
                continue
            scale = self.layer_decay ** (n_layers - ids[pname]) if ids else 1.0
            wd = 0.0 if p.ndim <= 1 or pname.endswith(".bias") else self.weight_decay
            groups.setdefault((scale, wd), []).append(p)
        groups.setdefault((self.head_lr_scale, self.weight_decay), []).append(model.head.weight)
        groups.setdefault((self.head_lr_scale, 0.0), []).append(model.head.bias)
        return [{"params": ps, "lr_scale": s, "weight_decay": wd} for (s, wd), ps in groups.items()]

    def _predict(self, model: _Classifier, records, index: np.ndarray, rows, leads, context) -> np.ndarray:
        device = torch.device(context.device)
        out = []
        with eval_mode(model), torch.no_grad():
            for x in iter_signal_batches(records, rows, context.batch_size, index):
                with autocast(context):
                    logits = model(x.to(device), leads).float()
                probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)
                out.append(probs.cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def evaluate(self, encoder: Encoder, records, context: EvalContext) -> dict[str, Any]:
        """Train on train, choose the epoch on val, score test once with that epoch's weights."""
        if not isinstance(records.signals, np.ndarray):
            raise ConfigError("records are ragged (different lengths); preprocess them before evaluation.")
        task = prepare_task(records, self.multi_label, self.name)
        device = torch.device(context.device)
        rows, names = lead_rows(records, None)
        leads = encoder_leads(encoder, names)
        y_train = task.targets["train"]
        n_train = len(task.index["train"])
        # a final batch of one record would break batch norm in train mode: it is left out
        usable = n_train - 1 if n_train % self.batch_size == 1 and n_train > 1 else n_train
        steps_per_epoch = -(-usable // self.batch_size)
        if self.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, self.max_steps_per_epoch)
        total = self.epochs * steps_per_epoch
        warmup = min(self.warmup_epochs, self.epochs) * steps_per_epoch
        info: dict[str, Any] = {}
        with seeded(context.seed, device):
            model = _Classifier(copy.deepcopy(encoder), len(task.class_names))
            if self.from_scratch:
                info["reinitialised"] = reinitialise(model.encoder, context.seed)
            model.to(device)
            for p in model.parameters():
                p.requires_grad_(True)
            opt = torch.optim.AdamW(self._param_groups(model), lr=self.lr)
            gen = torch.Generator().manual_seed(context.seed)
            best, history = BestOnValidation(offload=True), []
            step = 0
            train_losses = []
            for epoch in range(self.epochs):
                model.train()
                perm = torch.randperm(n_train, generator=gen).numpy()[: min(usable, steps_per_epoch * self.batch_size)]
                epoch_loss = 0.0
                for b, x in enumerate(iter_signal_batches(records, rows, self.batch_size, task.index["train"][perm])):
                    target = torch.from_numpy(y_train[perm[b * self.batch_size:(b + 1) * self.batch_size]]).to(device)
                    lr = cosine_lr(step, total, self.lr, warmup_steps=warmup)
                    for group in opt.param_groups:
                        group["lr"] = lr * group["lr_scale"]
                    with autocast(context):
                        logits = model(x.to(device), leads).float()
                    if self.multi_label:
                        loss = F.binary_cross_entropy_with_logits(logits, target)
                    else:
                        loss = F.cross_entropy(logits, target.argmax(dim=1))
                    if not torch.isfinite(loss):
                        raise ConfigError(
                            f"evaluator 'finetune': the loss became {loss.item()} at epoch {epoch + 1}; "
                            f"lower 'base_lr' or use precision 'fp32'."
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    epoch_loss += float(loss.detach())
                    step += 1
                train_losses.append(epoch_loss / max(1, steps_per_epoch))
                val_scores = self._predict(model, records, task.index["val"], rows, leads, context)
                val_auc = auc_macro(task.targets["val"], val_scores)
                history.append(float(val_auc))
                if not best.update(val_auc, epoch + 1, model) and self.patience \
                        and best.since_best >= self.patience:
                    break
            model.load_state_dict(best.best_state())
            test_scores = self._predict(model, records, task.index["test"], rows, leads, context)
        out = score_classification(
            task.targets["test"], test_scores, task.class_names, multi_label=self.multi_label,
            threshold=self.threshold, n_resamples=self.bootstrap, seed=context.seed, alpha=self.alpha,
        )
        out.update(
            val_auc_macro=best.score, epoch=best.epoch, epochs_run=len(history), lr=self.lr,
            val_auc_history=history, train_loss_history=train_losses, n_train=n_train,
            headline=["auc_macro", "f1_macro"],
            protocol={**self.protocol(), **task.protocol()},
            **info,
        )
        if not self.multi_label:
            out["n_dropped_not_single_label"] = dict(task.dropped)
        return out
