"""Contrastive losses shared by all methods: NT-Xent (SimCLR) and a general InfoNCE.

All losses are computed in float32 whatever the autocast dtype of their inputs, since
softmaxes over hundreds of logits at temperature 0.1 lose too much precision in bf16.
Casting with ``.float()`` is not enough inside an autocast region (autocast recasts a
matmul's inputs to bf16), so the similarity matmuls and the losses run in
:func:`float32_region`, with autocast off.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

REDUCTIONS = ("pairs", "rows")


def float32_region(device: torch.device | str):
    """A context with autocast off for ``device``'s type: ops run in their inputs' dtype there.

    Cast the inputs to float32 inside it. Device types without autocast get a no-op context.
    """
    device_type = torch.device(device).type
    available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if available is not None and not available(device_type):
        return contextlib.nullcontext()
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # older torch: a device type without autocast
        return contextlib.nullcontext()


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

    The loss is float32 (autocast off). The masks are checked where they live: pass them
    on the CPU to keep a GPU step free of host syncs (they are then copied asynchronously).
    """
    if logits.dim() != 2 or positive_mask.shape != logits.shape:
        raise ValueError(
            f"logits must be [N, M] and positive_mask the same shape; got {tuple(logits.shape)} "
            f"and {tuple(positive_mask.shape)}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    positive_mask = positive_mask.bool()
    if exclude is not None:
        exclude = exclude.bool()
        if (exclude.to(positive_mask.device) & positive_mask).any():
            raise ValueError("an entry cannot be both a positive and excluded from the denominator")
    n_pos = positive_mask.sum(dim=1)
    if not bool((n_pos > 0).any()):
        raise ValueError("positive_mask has no positive pair: every InfoNCE row needs at least one positive")
    one_each = bool((n_pos == 1).all())
    device = logits.device
    with float32_region(device):
        logits = logits.float()
        if exclude is not None:
            logits = logits.masked_fill(exclude.to(device, non_blocking=True), float("-inf"))
        if one_each:  # one positive per row: both reductions are a plain cross entropy
            target = positive_mask.to(torch.uint8).argmax(dim=1).to(device, non_blocking=True)
            return F.cross_entropy(logits, target)
        positive_mask = positive_mask.to(device, non_blocking=True)
        n_pos = n_pos.to(device, non_blocking=True)
        return _multi_positive_nce(logits, positive_mask, n_pos, reduction)


def _multi_positive_nce(
    logits: torch.Tensor, positive_mask: torch.Tensor, n_pos: torch.Tensor, reduction: str
) -> torch.Tensor:
    """The general InfoNCE of :func:`info_nce_from_logits` (float32 ``logits``, masks on their device)."""
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
    with float32_region(query.device):
        logits = similarity_logits(query, keys, temperature, normalize)
        return info_nce_from_logits(logits, positive_mask, exclude=exclude, reduction=reduction)


def similarity_logits(
    query: torch.Tensor, keys: torch.Tensor, temperature: float = 1.0, normalize: bool = True
) -> torch.Tensor:
    """``sim(query_i, key_j) / temperature`` ``[N, M]`` in float32, autocast off (cosine when ``normalize``)."""
    with float32_region(query.device):
        query, keys = query.float(), keys.float()
        if normalize:
            query, keys = F.normalize(query, dim=1), F.normalize(keys, dim=1)
        return query @ keys.t() / temperature


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
    device = z1.device
    with float32_region(device):
        z = torch.cat([z1, z2]).float()
        logits = similarity_logits(z, z, temperature)
        eye = torch.eye(2 * n, dtype=torch.bool, device=device)
        logits = logits.masked_fill(eye, float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n, device=device), torch.arange(0, n, device=device)])
        return F.cross_entropy(logits, target)
