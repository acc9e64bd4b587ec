"""Helpers to score precomputed features and to build small synthetic evaluation data.

:class:`FlattenEncoder` is an :class:`~ssl4ecg.interfaces.Encoder` without weights whose
embedding is the flattened signal. Wrapping precomputed features as ``[N, 1, D]`` "signals"
lets every evaluator score them (e.g. hand-made clinical features), and it is the encoder the
evaluation tests use. :func:`synthetic_records` builds a small labelled RecordSet.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ssl4ecg.data.records import RecordSet
from ssl4ecg.interfaces import Encoder, SignalSpec


class FlattenEncoder(Encoder):
    """An encoder with no weights: one token per record holding the flattened (selected) leads."""

    def __init__(self, spec: SignalSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed_dim = spec.n_leads * spec.n_samples

    def tokens(self, x: torch.Tensor, leads: Sequence[str] | None = None) -> torch.Tensor:
        """``[B, 1, leads * T]``; checks that ``leads`` are known and match ``x``."""
        rows = self.lead_indices(leads)
        if x.shape[1] != len(rows):
            raise ValueError(f"x has {x.shape[1]} leads but leads names {len(rows)}")
        return x.reshape(x.shape[0], 1, -1)


def features_as_records(
    features: np.ndarray,
    labels: np.ndarray | None,
    splits: Sequence[str],
    class_names: Sequence[str] = (),
    extra: dict[str, np.ndarray] | None = None,
) -> RecordSet:
    """A RecordSet whose one-lead "signals" are ``features`` ``[N, D]`` (score them with FlattenEncoder)."""
    features = np.asarray(features, dtype=np.float32)
    n = len(features)
    return RecordSet(
        signals=features[:, None, :],
        leads=("F",),
        sampling_rate=1.0,
        record_ids=np.array([f"r{i:05d}" for i in range(n)]),
        splits=np.asarray(splits),
        labels=None if labels is None else np.asarray(labels, dtype=np.float32),
        class_names=tuple(class_names),
        extra=dict(extra or {}),
    )


def synthetic_records(
    n_per_split: tuple[int, int, int] = (200, 100, 100),
    n_classes: int = 3,
    dim: int = 8,
    multi_label: bool = True,
    separation: float = 4.0,
    noise: float = 1.0,
    seed: int = 0,
) -> RecordSet:
    """Gaussian features ``[N, D]`` whose class means differ by ``separation`` along class axes.

    Multi-label: each class is present with probability 0.4 independently and shifts feature
    ``c`` by ``+separation``; multi-class: one class per record. Splits are train/val/test in
    the sizes ``n_per_split``.
    """
    rng = np.random.default_rng(seed)
    n = int(sum(n_per_split))
    if multi_label:
        y = (rng.random((n, n_classes)) < 0.4).astype(np.float32)
    else:
        y = np.eye(n_classes, dtype=np.float32)[rng.integers(0, n_classes, n)]
    x = rng.normal(0.0, noise, (n, dim))
    x[:, :n_classes] += separation * y
    splits = np.repeat(["train", "val", "test"], n_per_split)
    return features_as_records(x, y, splits, [f"c{i}" for i in range(n_classes)])
