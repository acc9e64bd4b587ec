"""Reduced-lead linear evaluation: the probe on features computed from a subset of the leads."""

from __future__ import annotations

from typing import Any

from ssl4ecg.errors import ConfigError
from ssl4ecg.eval.common import prepare_task
from ssl4ecg.eval.features import extract_features, lead_rows
from ssl4ecg.eval.linear_probe import LinearProbe
from ssl4ecg.interfaces import EvalContext, Encoder


class ReducedLeads(LinearProbe):
    """Linear probe on ``encoder.embed(x[:, leads], leads=leads)`` for every lead set.

    The encoder sees only the chosen leads (e.g. lead II alone, or II and V1, as in ECG-JEPA's
    reduced-lead experiments). Each set gets its own probe (chosen on val) and reports
    ``auc_macro@II+V1``, ``f1_macro@II+V1`` with bootstrap intervals, and per-class AUCs.
    """

    name = "reduced_leads"

    def __init__(
        self,
        lead_sets: tuple = (("II",), ("II", "V1")),
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
        super().__init__(
            solver=solver, l2_grid=l2_grid, max_iter=max_iter, multi_label=multi_label, standardize=standardize, epochs=epochs, lr=lr,
            weight_decay=weight_decay, batch_size=batch_size, warmup_epochs=warmup_epochs,
            lr_grid=lr_grid, weight_decay_grid=weight_decay_grid, head_init=head_init, threshold=threshold,
            bootstrap=bootstrap, alpha=alpha,
        )
        ok = isinstance(lead_sets, (list, tuple)) and len(lead_sets) > 0 and all(
            isinstance(s, (list, tuple)) and len(s) > 0 and all(isinstance(x, str) for x in s)
            and len(set(s)) == len(s) for s in lead_sets)
        if not ok:
            raise ConfigError(
                f"evaluator 'reduced_leads': key 'lead_sets' must be a non-empty list of non-empty "
                f"lists of distinct lead names, e.g. [[\"II\"], [\"II\", \"V1\"]]; got {lead_sets!r}."
            )
        self.lead_sets = tuple(tuple(s) for s in lead_sets)

    def protocol(self) -> dict[str, Any]:
        """Probe options plus the lead sets."""
        return {**super().protocol(), "lead_sets": [list(s) for s in self.lead_sets]}

    def evaluate(self, encoder: Encoder, records, context: EvalContext) -> dict[str, Any]:
        """One probe per lead set; results keyed ``metric@LEAD+LEAD``."""
        for leads in self.lead_sets:
            try:
                lead_rows(records, leads)
                if hasattr(encoder, "lead_indices"):
                    encoder.lead_indices(leads)
            except ConfigError as exc:
                raise ConfigError(f"evaluator 'reduced_leads': key 'lead_sets': {exc}") from None
        task = prepare_task(records, self.multi_label, self.name)
        parts = {s: records.subset(task.index[s]) for s in task.index}
        out: dict[str, Any] = {"headline": []}
        for leads in self.lead_sets:
            tag = "+".join(leads)
            feats = {s: extract_features(encoder, part, context, leads=leads) for s, part in parts.items()}
            res = self.score_features(task, feats, context.seed)
            for key in ("auc_macro", "f1_macro"):
                out[f"{key}@{tag}"] = res[key]
                if f"{key}_ci" in res:
                    out[f"{key}@{tag}_ci"] = res[f"{key}_ci"]
                out["headline"].append(f"{key}@{tag}")
            out[f"details@{tag}"] = {
                k: res[k] for k in ("auc_per_class", "auc_per_class_ci", "classes_excluded",
                                    "val_auc_macro", "epoch", "lr", "weight_decay", "l2") if k in res
            }
        out["protocol"] = {**self.protocol(), **task.protocol()}
        return out
