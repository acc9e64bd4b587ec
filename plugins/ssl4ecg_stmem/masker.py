"""ST-MEM masking: independent random masking per sample and per lead."""

from __future__ import annotations

import torch

from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import Masker


class STMEMRandomMasker(Masker):
    """Mask a fixed fraction of the patches of every lead, drawn independently per sample and lead.

    Each ``(sample, lead)`` row keeps ``int(n_slots * (1 - ratio))`` patches chosen uniformly
    at random and masks the rest (MAE's rounding: 30 patches at ratio 0.75 -> 7 visible,
    23 masked). ``ratio`` must be in (0, 1).
    """

    def __init__(self, ratio: float = 0.75) -> None:
        if not 0.0 < ratio < 1.0:
            raise ConfigError(f"[masker] ratio must be in (0, 1), got {ratio}")
        self.ratio = float(ratio)

    def n_visible(self, n_slots: int) -> int:
        """Visible patches per lead for ``n_slots`` patches."""
        return int(n_slots * (1.0 - self.ratio))

    def sample(self, batch_size: int, n_leads: int, n_slots: int, generator: torch.Generator) -> torch.Tensor:
        """Bool mask ``[batch_size, n_leads, n_slots]``, True = masked, same count in every row."""
        noise = torch.rand(batch_size, n_leads, n_slots, generator=generator)
        rank = torch.argsort(torch.argsort(noise, dim=-1), dim=-1)  # rank of each slot's noise
        return rank >= self.n_visible(n_slots)
