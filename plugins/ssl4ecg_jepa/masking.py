"""ECG-JEPA's time-slot maskers: a masked slot is masked in every lead.

Both maskers return ``[batch, n_leads, n_slots]`` bool masks (True = masked) whose rows are
identical across leads. With ``per_sample=False`` (the reference) one slot mask is drawn
per batch and shared by all samples; the returned tensor is then a broadcast view of a
single row, so nothing per sample is materialised. With ``per_sample=True`` every sample
gets its own slots, and the number of *visible* slots is made equal across the batch so
that the context encoder can gather a dense ``[B, S_vis]`` grid (see each class).
"""

from __future__ import annotations

import torch

from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import Masker


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _broadcast(slot_mask: torch.Tensor, batch_size: int, n_leads: int) -> torch.Tensor:
    """``[1 or B, S]`` slot masks -> ``[B, L, S]`` (a view: identical across leads)."""
    return slot_mask[:, None, :].expand(batch_size, n_leads, slot_mask.shape[1])


def equalise_visible_(slot_mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mask extra random visible slots until every row has the batch's minimum visible count.

    ``slot_mask`` is ``[B, S]`` (True = masked) and is modified in place and returned. Rows
    already at the minimum are untouched; in the others, the extra slots to mask are a
    uniformly random subset of their visible slots.
    """
    visible = ~slot_mask
    n_visible = visible.sum(dim=1)
    target = int(n_visible.min())
    excess = n_visible - target
    if int(excess.max()) == 0:
        return slot_mask
    # random rank among each row's visible slots; mask those ranked below the row's excess
    scores = torch.rand(slot_mask.shape, generator=generator).masked_fill_(slot_mask, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    slot_mask |= visible & (rank < excess[:, None])
    return slot_mask


class RandomSlotMasker(Masker):
    """Random masking ("rb"): mask ``int(n_slots * U(ratio_min, ratio_max))`` random time slots.

    The count is clamped to ``[1, n_slots - 1]`` so there is always a target and a context
    (no effect at the paper's 50 slots). ``per_sample=True`` draws the count once per batch
    (so visible counts are equal by construction) and the slots independently per sample.
    """

    def __init__(self, ratio_min: float = 0.6, ratio_max: float = 0.7, per_sample: bool = False) -> None:
        if not 0.0 <= ratio_min <= ratio_max < 1.0:
            raise ConfigError(
                f"[masker] random needs 0 <= ratio_min <= ratio_max < 1, got ratio_min={ratio_min}, "
                f"ratio_max={ratio_max} (the paper uses 0.6 and 0.7)."
            )
        self.ratio_min = ratio_min
        self.ratio_max = ratio_max
        self.per_sample = per_sample

    def n_masked(self, n_slots: int, generator: torch.Generator) -> int:
        """Draw how many slots to mask for one batch."""
        ratio = float(_uniform(1, self.ratio_min, self.ratio_max, generator))
        return min(max(int(n_slots * ratio), 1), n_slots - 1)

    def sample(self, batch_size: int, n_leads: int, n_slots: int, generator: torch.Generator) -> torch.Tensor:
        """Bool ``[batch_size, n_leads, n_slots]``, True = masked, whole slots across leads."""
        _check_slots(n_slots)
        n_mask = self.n_masked(n_slots, generator)
        rows = batch_size if self.per_sample else 1
        if rows == 1:
            chosen = torch.randperm(n_slots, generator=generator)[:n_mask][None, :]
        else:
            chosen = torch.rand(rows, n_slots, generator=generator).argsort(dim=1)[:, :n_mask]
        slot_mask = torch.zeros(rows, n_slots, dtype=torch.bool).scatter_(1, chosen, True)
        return _broadcast(slot_mask, batch_size, n_leads)


class MultiBlockSlotMasker(Masker):
    """Multi-block masking ("mb"): the union of ``n_blocks`` contiguous runs of time slots.

    Each block has length ``int(n_slots * U(scale_min, scale_max))`` (at least 1) and a start
    drawn uniformly from ``0 .. n_slots - length - 1`` -- the reference's rule, which never
    masks the last slot. Blocks may overlap, so the masked fraction varies (mean about 0.55
    at the paper's 4 x U(0.175, 0.225) over 50 slots). ``per_sample=True`` draws blocks per
    sample, then masks extra random visible slots in every sample that has more visible
    slots than the batch minimum (:func:`equalise_visible_`).
    """

    def __init__(
        self,
        n_blocks: int = 4,
        scale_min: float = 0.175,
        scale_max: float = 0.225,
        per_sample: bool = False,
    ) -> None:
        if n_blocks < 1:
            raise ConfigError(f"[masker] multiblock needs n_blocks >= 1, got {n_blocks}.")
        if not 0.0 <= scale_min <= scale_max < 1.0:
            raise ConfigError(
                f"[masker] multiblock needs 0 <= scale_min <= scale_max < 1, got scale_min={scale_min}, "
                f"scale_max={scale_max} (the paper uses 0.175 and 0.225)."
            )
        self.n_blocks = n_blocks
        self.scale_min = scale_min
        self.scale_max = scale_max
        self.per_sample = per_sample

    def slot_masks(self, n_rows: int, n_slots: int, generator: torch.Generator) -> torch.Tensor:
        """``n_rows`` independent block-union masks ``[n_rows, n_slots]`` (True = masked)."""
        scale = _uniform(n_rows * self.n_blocks, self.scale_min, self.scale_max, generator)
        length = (n_slots * scale).long().clamp_(1, n_slots - 1).view(n_rows, self.n_blocks)
        start = (torch.rand(length.shape, generator=generator, dtype=torch.float64) * (n_slots - length)).long()
        slots = torch.arange(n_slots)
        inside = (slots >= start[..., None]) & (slots < (start + length)[..., None])
        return inside.any(dim=1)

    def sample(self, batch_size: int, n_leads: int, n_slots: int, generator: torch.Generator) -> torch.Tensor:
        """Bool ``[batch_size, n_leads, n_slots]``, True = masked, whole slots across leads."""
        _check_slots(n_slots)
        slot_mask = self.slot_masks(batch_size if self.per_sample else 1, n_slots, generator)
        if self.per_sample:
            equalise_visible_(slot_mask, generator)
        return _broadcast(slot_mask, batch_size, n_leads)


def _check_slots(n_slots: int) -> None:
    if n_slots < 2:
        raise ConfigError(
            f"time-slot masking needs at least 2 slots per lead, the encoder has {n_slots}; "
            f"use a smaller patch_size or longer signals."
        )
