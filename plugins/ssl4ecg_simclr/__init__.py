"""SimCLR for ECG (Chen et al. 2020): two augmented views, projection head, NT-Xent.

Registers objective ``"simclr"``. See ``docs/methods/simclr.md``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl4ecg import hookimpl
from ssl4ecg.augment import build_augmentations, default_ecg_augmentations
from ssl4ecg.interfaces import Batch, Encoder, LossOutput, Objective, SignalSpec, StepInfo
from ssl4ecg.nn.heads import ProjectionHead
from ssl4ecg.nn.losses import nt_xent


class SimCLR(Objective):
    """SimCLR: NT-Xent between projections of two independently augmented views of each ECG.

    Each view is ``augmentations(signal)`` with fresh randomness from the loop's device
    generator (``StepInfo.device_generator``: the noise is drawn where the batch lives);
    both go through ``encoder.embed`` (h) and the projection head (z); the loss is NT-Xent
    over the 2B projections with ``temperature``. ``augmentations`` is a list of recipe
    tables (default: the ECG-JEPA paper's set, see
    :data:`ssl4ecg.augment.ECG_DEFAULT_AUGMENTATIONS`; powerline noise is dropped for data
    sampled at 100 Hz or less). ``proj_layers = 0`` uses h itself (no head).
    """

    def __init__(
        self,
        encoder: Encoder,
        spec: SignalSpec,
        registry: Any = None,
        augmentations: list[dict[str, Any]] | None = None,
        temperature: float = 0.1,
        proj_dim: int = 128,
        proj_hidden_dim: int | None = None,
        proj_layers: int = 2,
        proj_batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if proj_layers < 0:
            raise ValueError(f"proj_layers must be >= 0 (0 = no projection head), got {proj_layers}")
        self.encoder = encoder
        self.spec = spec
        self.temperature = float(temperature)
        tables = default_ecg_augmentations(spec.sampling_rate) if augmentations is None else augmentations
        self.augment = build_augmentations(registry, tables, "objective.augmentations", spec=spec)
        if len(self.augment) == 0:
            raise ValueError("augmentations is empty: SimCLR needs at least one augmentation to make two views")
        self.head: nn.Module = (
            nn.Identity()
            if proj_layers == 0
            else ProjectionHead(encoder.embed_dim, proj_dim, proj_hidden_dim, proj_layers, proj_batch_norm)
        )

    def views(self, batch: Batch, step: StepInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independently augmented copies of ``batch.signal`` (draws from ``step.device_generator``)."""
        x = batch.signal
        return (
            self.augment(x, batch.sampling_rate, step.device_generator),
            self.augment(x, batch.sampling_rate, step.device_generator),
        )

    def loss(self, batch: Batch, step: StepInfo) -> LossOutput:
        """NT-Xent between the projections of the two views."""
        v1, v2 = self.views(batch, step)
        n = v1.shape[0]
        h = self.encoder.embed(torch.cat([v1, v2]), batch.leads)  # one pass: shared BN statistics
        z = self.head(h)
        z1, z2 = z[:n], z[n:]
        loss = nt_xent(z1, z2, self.temperature)
        with torch.no_grad():
            pos_cos = F.cosine_similarity(z1.float(), z2.float(), dim=1).mean()
        return LossOutput(loss, {"pos_cos": pos_cos}, representation=h[:n].detach())


@hookimpl
def ssl4ecg_register(registry) -> None:
    """Register objective ``simclr``."""
    registry.add("objective", "simclr", SimCLR)
