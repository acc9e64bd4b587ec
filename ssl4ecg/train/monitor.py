"""Collapse monitor: watches the spread and effective rank of an objective's representation.

Joint-embedding objectives can fall into trivial solutions in which every record maps to
(nearly) the same vector while the loss looks excellent. Every objective may return its
batch representation in :class:`ssl4ecg.interfaces.LossOutput`; this monitor turns it into
two numbers logged with the loss and warns once when they say "collapsed".
"""

from __future__ import annotations

import math
import warnings

import torch


class CollapseWarning(UserWarning):
    """The representation has (nearly) collapsed."""


def representation_stats(z: torch.Tensor) -> dict[str, float]:
    """Spread and effective rank of a batch of representations ``z`` ``[B, D]``.

    * ``rep_std``: mean over dimensions of the across-batch std of L2-normalised ``z``,
      times ``sqrt(D)`` -- about 1 for well-spread vectors, 0 for a collapsed batch.
    * ``rep_rank``: effective rank, ``exp`` of the entropy of the normalised singular values
      of the centred batch (Roy & Vetterli 2007); between 1 and ``min(B, D)``.
    """
    z = z.detach().float()
    if z.ndim != 2 or z.shape[0] < 2:
        return {}
    d = z.shape[1]
    normed = torch.nn.functional.normalize(z, dim=1)
    spread = normed.std(dim=0).mean().item() * math.sqrt(d)
    centred = z - z.mean(dim=0, keepdim=True)
    singular = torch.linalg.svdvals(centred)
    total = singular.sum()
    if total <= 0:
        rank = 1.0
    else:
        p = singular / total
        p = p[p > 0]
        rank = float(torch.exp(-(p * p.log()).sum()))
    return {"rep_std": spread, "rep_rank": rank}


class CollapseMonitor:
    """Keeps the latest representation statistics and warns once on collapse.

    The spread of a pooled representation at random initialisation depends on the
    architecture (a position-dominated ViT pools to nearly identical vectors), so the spread
    is judged relative to the first measurement: a fall below ``relative_std`` of it, or an
    effective rank below ``min_rank``, for ``patience`` consecutive checks is reported.
    """

    def __init__(self, relative_std: float = 0.1, min_rank: float = 1.5, patience: int = 3) -> None:
        self.relative_std = relative_std
        self.min_rank = min_rank
        self.patience = patience
        self._bad = 0
        self.initial_std: float | None = None
        self.warned = False
        self.last: dict[str, float] = {}

    def update(self, z: torch.Tensor | None, step: int) -> dict[str, float]:
        """Statistics of ``z`` (empty when ``z`` is None); warns after ``patience`` bad checks."""
        if z is None:
            return {}
        stats = representation_stats(z)
        if not stats:
            return {}
        if self.initial_std is None:
            self.initial_std = stats["rep_std"]
        self.last = stats
        collapsed = (stats["rep_std"] < self.relative_std * self.initial_std
                     or stats["rep_rank"] < self.min_rank)
        self._bad = self._bad + 1 if collapsed else 0
        if self._bad >= self.patience and not self.warned:
            self.warned = True
            warnings.warn(
                f"representation collapse suspected at step {step}: rep_std={stats['rep_std']:.4f} "
                f"(at the start {self.initial_std:.4f}), effective rank={stats['rep_rank']:.2f}. A very "
                "low loss here is not success; try a slower EMA, a lower learning rate, more masking "
                "or a larger batch.",
                CollapseWarning,
                stacklevel=2,
            )
        return stats

    def state_dict(self) -> dict:
        return {"initial_std": self.initial_std, "warned": self.warned, "bad": self._bad}

    def load_state_dict(self, state: dict) -> None:
        self.initial_std = state.get("initial_std")
        self.warned = state.get("warned", False)
        self._bad = state.get("bad", 0)
