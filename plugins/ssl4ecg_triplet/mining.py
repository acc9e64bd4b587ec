"""Multi-label-aware triplet mining (batch-hard and semi-hard) and the triplet margin loss.

Which records are positives / negatives of each other is decided from their multi-hot label
sets by the Jaccard index ``J(a, b) = |A & B| / |A | B|`` (two empty sets: ``J = 1``):

* positive pair: ``J >= pos_jaccard`` (default 1.0: identical label sets),
* negative pair: ``J <= neg_jaccard`` (default 0.0: disjoint label sets),
* anything in between (partly shared diagnoses) is neither and never used.

With single-label data this is the usual "same class / different class" rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Triplets:
    """Index triplets ``(anchor, positive, negative)`` into a batch, each ``[T]`` long."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor

    def __len__(self) -> int:
        return int(self.anchor.numel())


def jaccard(labels: torch.Tensor) -> torch.Tensor:
    """Pairwise Jaccard index ``[B, B]`` of multi-hot ``labels`` ``[B, C]`` (empty vs empty = 1)."""
    y = (labels > 0.5).float()
    inter = y @ y.t()
    size = y.sum(dim=1)
    union = size[:, None] + size[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(inter))


def pair_masks(labels: torch.Tensor, pos_jaccard: float = 1.0, neg_jaccard: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``[B, B]`` masks of positive pairs (never ``a == a``) and negative pairs."""
    if neg_jaccard >= pos_jaccard:
        raise ValueError(f"neg_jaccard ({neg_jaccard}) must be below pos_jaccard ({pos_jaccard})")
    j = jaccard(labels)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return (j >= pos_jaccard - 1e-9) & ~eye, j <= neg_jaccard + 1e-9


def pairwise_distances(z: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[B, B]`` (exact zeros on the diagonal, safe gradient)."""
    sq = z.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * z @ z.t()).clamp_min(0.0)
    zero = d2 <= 1e-12
    return torch.where(zero, torch.zeros_like(d2), d2.clamp_min(1e-12).sqrt())


def batch_hard(dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> Triplets:
    """For every anchor with a positive and a negative: its farthest positive and nearest negative."""
    valid = pos.any(dim=1) & neg.any(dim=1)
    anchors = torch.nonzero(valid).flatten()
    d = dist.detach()
    far_pos = torch.where(pos, d, torch.full_like(d, -float("inf"))).argmax(dim=1)
    near_neg = torch.where(neg, d, torch.full_like(d, float("inf"))).argmin(dim=1)
    return Triplets(anchors, far_pos[anchors], near_neg[anchors])


def semi_hard(dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, margin: float) -> Triplets:
    """For every positive pair ``(a, p)``: the nearest negative farther than ``p`` (FaceNet).

    Semi-hard negatives satisfy ``d(a, p) < d(a, n)``; the closest one is taken (it lies in the
    margin band when one exists there). When no negative is farther than ``p``, the farthest
    negative is used instead (the least violating one).
    """
    d = dist.detach()
    a_idx, p_idx = torch.nonzero(pos & neg.any(dim=1, keepdim=True), as_tuple=True)
    if a_idx.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=dist.device)
        return Triplets(empty, empty, empty)
    d_ap = d[a_idx, p_idx][:, None]  # [T, 1]
    d_an = d[a_idx]  # [T, B]
    negs = neg[a_idx]
    farther = negs & (d_an > d_ap)
    inf = torch.full_like(d_an, float("inf"))
    nearest_farther = torch.where(farther, d_an, inf).argmin(dim=1)
    farthest = torch.where(negs, d_an, -inf).argmax(dim=1)
    n_idx = torch.where(farther.any(dim=1), nearest_farther, farthest)
    del margin  # the band is implied by the loss; kept in the signature for clarity
    return Triplets(a_idx, p_idx, n_idx)


def triplet_loss(z: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, mining: str = "batch_hard",
                 pos_jaccard: float = 1.0, neg_jaccard: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean triplet margin loss ``relu(d(a, p) - d(a, n) + margin)`` over the mined triplets.

    Returns the loss (0 with a gradient path when the batch has no valid triplet) and logs:
    ``triplets`` (number mined), ``active`` (fraction with a positive loss).
    """
    dist = pairwise_distances(z)
    pos, neg = pair_masks(labels, pos_jaccard, neg_jaccard)
    if mining == "batch_hard":
        t = batch_hard(dist, pos, neg)
    elif mining == "semi_hard":
        t = semi_hard(dist, pos, neg, margin)
    else:
        raise ValueError(f"mining must be 'batch_hard' or 'semi_hard', got {mining!r}")
    if len(t) == 0:
        return z.sum() * 0.0, {"triplets": 0.0, "active": 0.0}
    losses = torch.relu(dist[t.anchor, t.positive] - dist[t.anchor, t.negative] + margin)
    return losses.mean(), {"triplets": float(len(t)), "active": float((losses > 0).float().mean())}
