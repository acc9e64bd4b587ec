"""Contrastive losses shared by all methods: NT-Xent (SimCLR) and a general InfoNCE.

All losses are computed in float32 whatever the autocast dtype of their inputs, since
softmaxes over hundreds of logits at temperature 0.1 lose too much precision in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("pairs", "rows")


def info_nce_from_logits(
    logits: torch.Tensor,
    positive_mask: torch.Tensor,
    exclude: torch.Tensor | None = None,
    reduction: str = "pairs",
) -> torch.Tensor:
    """InfoNCE on precomputed ``logits [N, M]`` with any number of positives per row.

    Every positive entry ``(i, j)`` of ``positive_mask`` contributes the term
    ``-log(exp(logits[i, j]) / sum_k exp(logits[i, k]))``; the denominator runs over every
    column of row ``i`` except those marked in ``exclude`` (e.g. the self-similarity).
    ``reduction = "pairs"`` averages the terms over all positive pairs; ``"rows"`` first
    averages within each row (as SupCon does), then over rows that have a positive.
    """
    if logits.dim() != 2 or positive_mask.shape != logits.shape:
        raise ValueError(
            f"logits must be [N, M] and positive_mask the same shape; got {tuple(logits.shape)} "
            f"and {tuple(positive_mask.shape)}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    positive_mask = positive_mask.bool()
    logits = logits.float()
    if exclude is not None:
        exclude = exclude.bool()
        if (exclude & positive_mask).any():
            raise ValueError("an entry cannot be both a positive and excluded from the denominator")
        logits = logits.masked_fill(exclude, float("-inf"))
    n_pos = positive_mask.sum(dim=1)
    if not bool((n_pos > 0).any()):
        raise ValueError("positive_mask has no positive pair: every InfoNCE row needs at least one positive")
    if bool((n_pos == 1).all()):  # one positive per row: both reductions are a plain cross entropy
        return F.cross_entropy(logits, positive_mask.to(torch.uint8).argmax(dim=1))
    log_prob = torch.log_softmax(logits, dim=1)
    # zero (not -inf * 0) where an entry is not a positive
    pos_log_prob = torch.where(positive_mask, log_prob, torch.zeros_like(log_prob))
    if reduction == "pairs":
        return -pos_log_prob.sum() / n_pos.sum()
    rows = n_pos > 0
    return -(pos_log_prob.sum(dim=1)[rows] / n_pos[rows]).mean()


def info_nce(
    query: torch.Tensor,
    keys: torch.Tensor,
    positive_mask: torch.Tensor,
    temperature: float = 0.1,
    normalize: bool = True,
    exclude: torch.Tensor | None = None,
    reduction: str = "pairs",
) -> torch.Tensor:
    """InfoNCE between ``query [N, D]`` and ``keys [M, D]`` with several positives per row.

    Logits are ``sim(query_i, key_j) / temperature`` where ``sim`` is the cosine similarity
    (``normalize = True``) or the dot product. ``positive_mask [N, M]`` marks the positive
    keys of each query; all other non-``exclude``-d keys are its negatives. See
    :func:`info_nce_from_logits` for the reduction.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if query.dim() != 2 or keys.dim() != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(f"query [N, D] and keys [M, D] must share D; got {tuple(query.shape)}, {tuple(keys.shape)}")
    query, keys = query.float(), keys.float()
    if normalize:
        query, keys = F.normalize(query, dim=1), F.normalize(keys, dim=1)
    logits = query @ keys.t() / temperature
    return info_nce_from_logits(logits, positive_mask, exclude=exclude, reduction=reduction)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross entropy for paired views ``[N, D]``.

    The 2N projections are L2-normalised; each one's positive is the other view of the same
    sample and its negatives the other 2N - 2 projections (itself excluded). The loss is
    the mean over all 2N anchors.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be [N, D]; got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError("nt_xent needs at least 2 samples (the negatives are the other samples)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.t() / temperature
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)
