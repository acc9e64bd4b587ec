"""ST-MEM (Na et al., ICLR 2024) as an ssl4ecg plugin.

Registers the encoder ``stmem_vit``, the masker ``stmem_random`` and the objective ``stmem``.
See ``docs/methods/stmem.md``.
"""

from __future__ import annotations

from ssl4ecg import hookimpl

from ssl4ecg_stmem.encoder import STMEMEncoder, VisibleEncoding
from ssl4ecg_stmem.masker import STMEMRandomMasker
from ssl4ecg_stmem.objective import STMEMDecoder, STMEMObjective, masked_patch_mse

__all__ = [
    "STMEMDecoder", "STMEMEncoder", "STMEMObjective", "STMEMRandomMasker", "VisibleEncoding",
    "masked_patch_mse",
]


@hookimpl
def ssl4ecg_register(registry) -> None:
    """Register the ST-MEM encoder, masker and objective."""
    registry.add("encoder", "stmem_vit", STMEMEncoder)
    registry.add("masker", "stmem_random", STMEMRandomMasker)
    registry.add("objective", "stmem", STMEMObjective)
