"""Evaluators, metrics with bootstrap intervals, comparison tables and plots.

Evaluators (kind ``"evaluator"``; recipe ``[[eval]]`` keys are their constructor arguments):

==================== ====================================================================
``linear_probe``     one linear layer on frozen pooled features (ECG-JEPA protocol)
``finetune``         encoder + linear head trained end to end; ``from_scratch`` baseline
``low_shot``         linear probe on nested stratified fractions of train, seeded trials
``reduced_leads``    linear probe on features computed from a subset of the leads
``feature_regression`` ridge regression of heart rate / QRS duration on frozen features
``knn``              k-nearest-neighbour label fractions on frozen features
``clustering``       Davies-Bouldin, silhouette, Calinski-Harabasz of the true classes
``stats_baseline``   hand-crafted per-lead statistics + logistic regression (no encoder)
==================== ====================================================================

See ``docs/evaluation.md`` for options and protocol rules.
"""

from __future__ import annotations


def register(registry) -> None:
    """Register the core's evaluators."""
    from ssl4ecg.eval.clustering import Clustering
    from ssl4ecg.eval.feature_regression import FeatureRegression
    from ssl4ecg.eval.finetune import Finetune
    from ssl4ecg.eval.knn import KNN
    from ssl4ecg.eval.linear_probe import LinearProbe
    from ssl4ecg.eval.low_shot import LowShot
    from ssl4ecg.eval.reduced_leads import ReducedLeads
    from ssl4ecg.eval.stats_baseline import StatsBaseline

    registry.add("evaluator", "linear_probe", LinearProbe)
    registry.add("evaluator", "finetune", Finetune)
    registry.add("evaluator", "low_shot", LowShot)
    registry.add("evaluator", "reduced_leads", ReducedLeads)
    registry.add("evaluator", "feature_regression", FeatureRegression)
    registry.add("evaluator", "knn", KNN)
    registry.add("evaluator", "clustering", Clustering)
    registry.add("evaluator", "stats_baseline", StatsBaseline)
