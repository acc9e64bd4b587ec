"""ECG-JEPA (Kim 2024) for ssl4ecg: CroPA ViT encoder, time-slot maskers, per-lead predictor.

Registers:

* encoder ``cropa_vit`` -- :class:`~ssl4ecg_jepa.encoder.CroPAViT`
* maskers ``random`` and ``multiblock`` -- :mod:`ssl4ecg_jepa.masking`
* objective ``jepa`` -- :class:`~ssl4ecg_jepa.objective.JEPAObjective`

Released reference checkpoints are imported with
:func:`ssl4ecg_jepa.reference.import_reference_checkpoint`. See ``docs/methods/jepa.md``.
"""

from __future__ import annotations

from ssl4ecg import hookimpl

from ssl4ecg_jepa.encoder import CroPAViT, cropa_mask
from ssl4ecg_jepa.masking import MultiBlockSlotMasker, RandomSlotMasker
from ssl4ecg_jepa.objective import JEPAObjective
from ssl4ecg_jepa.predictor import JEPAPredictor
from ssl4ecg_jepa.reference import ecg_jepa_importer

__all__ = [
    "CroPAViT",
    "JEPAObjective",
    "JEPAPredictor",
    "MultiBlockSlotMasker",
    "RandomSlotMasker",
    "cropa_mask",
    "ssl4ecg_register",
]


@hookimpl
def ssl4ecg_register(registry) -> None:
    """Register the ECG-JEPA encoder, maskers and objective."""
    registry.add("encoder", "cropa_vit", CroPAViT)
    registry.add("masker", "random", RandomSlotMasker)
    registry.add("masker", "multiblock", MultiBlockSlotMasker)
    registry.add("objective", "jepa", JEPAObjective)
    registry.add("importer", "ecg-jepa", ecg_jepa_importer)
