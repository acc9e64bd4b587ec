"""Triplet-loss fine-tuning on a frozen encoder, as an ssl4ecg plugin.

Registers the evaluator ``triplet_probe`` (see ``docs/methods/triplet.md``): a head
``Linear(D, 64) -> Linear(64, classes)`` on frozen embeddings trained with a triplet margin loss
(batch-hard or semi-hard mining, multi-label rule by Jaccard thresholds) plus BCE; reports the
head's AUC/F1, the 64-d embedding's kNN AUC and its clustering metrics on test.
"""

from __future__ import annotations

from ssl4ecg import hookimpl

from ssl4ecg_triplet.evaluator import TripletHead, TripletProbe, label_set_batches
from ssl4ecg_triplet.mining import (
    Triplets,
    batch_hard,
    jaccard,
    pair_masks,
    pairwise_distances,
    semi_hard,
    triplet_loss,
)

__all__ = ["TripletHead", "TripletProbe", "Triplets", "batch_hard", "jaccard", "label_set_batches",
           "pair_masks", "pairwise_distances", "semi_hard", "triplet_loss"]


@hookimpl
def ssl4ecg_register(registry) -> None:
    """Register the ``triplet_probe`` evaluator."""
    registry.add("evaluator", "triplet_probe", TripletProbe)
