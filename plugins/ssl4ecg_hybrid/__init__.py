"""Hybrid input representation: frozen ECG embedding + clinical features, as an ssl4ecg plugin.

Registers the evaluator ``hybrid_probe`` (see ``docs/methods/hybrid.md``): the encoder's pooled
embedding and the clinical measurements of :mod:`ssl4ecg.clinical` (missing values imputed
with train medians plus missing indicators) are normalised per branch and combined by a
gated or concatenating fusion head trained on train, chosen on val and scored once on test.
"""

from __future__ import annotations

from ssl4ecg import hookimpl

from ssl4ecg_hybrid.evaluator import HybridProbe, predict, train_fusion_head
from ssl4ecg_hybrid.fusion import ClinicalPreprocessor, FusionHead

__all__ = ["ClinicalPreprocessor", "FusionHead", "HybridProbe", "predict", "train_fusion_head"]


@hookimpl
def ssl4ecg_register(registry) -> None:
    """Register the ``hybrid_probe`` evaluator."""
    registry.add("evaluator", "hybrid_probe", HybridProbe)
