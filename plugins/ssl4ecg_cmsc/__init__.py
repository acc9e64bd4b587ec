"""CMSC, Contrastive Multi-Segment Coding (Kiyasseh et al., CLOCS, ICML 2021).

Registers objective ``"cmsc"``. See ``docs/methods/cmsc.md``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ssl4ecg import hookimpl
from ssl4ecg.errors import ConfigError, DataError
from ssl4ecg.interfaces import Batch, Encoder, LossOutput, Objective, SignalSpec, StepInfo
from ssl4ecg.nn.heads import ProjectionHead
from ssl4ecg.nn.losses import info_nce


def adjacent_segments(
    x: torch.Tensor, segment: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two adjacent, non-overlapping ``segment``-sample windows of every record of ``x [B, L, T]``.

    When ``T > 2 * segment`` the pair starts at a random offset (per sample, from
    ``generator``). Returns ``(first [B, L, S], second [B, L, S], start [B])``; the second
    window begins where the first ends.
    """
    b, n_leads, n = x.shape
    if 2 * segment > n:
        raise ConfigError(
            f"cmsc needs two adjacent segments of {segment} samples but the records have only {n}; "
            f"lower [objective] segment_seconds or raise [data] seconds."
        )
    start = torch.randint(0, n - 2 * segment + 1, (b,), generator=generator)
    index = start.to(x.device, non_blocking=True)[:, None] + torch.arange(2 * segment, device=x.device)  # [B, 2S]
    pair = x.gather(2, index[:, None, :].expand(b, n_leads, 2 * segment))
    return pair[..., :segment], pair[..., segment:], start


def patient_positive_mask(
    patient_ids: Sequence[str | None], batch_size: int, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, B]`` bool: ``True`` where samples ``i`` and ``j`` are the same record or the same patient.

    Without patient ids (an empty list) only the diagonal (the two segments of one record)
    is positive; a missing id (``None`` or ``""``) matches no other sample. ``groups [B]``
    (e.g. the dataset of each sample in a mixture) must match too, so that equal patient
    ids from different datasets are not taken for one patient.
    """
    eye = torch.eye(batch_size, dtype=torch.bool)
    if len(patient_ids) == 0:
        return eye
    if len(patient_ids) != batch_size:
        raise DataError(f"the batch has {batch_size} signals but {len(patient_ids)} patient ids")
    codes: dict[str, int] = {}
    ids = torch.tensor([
        -1 - i if p is None or str(p) == "" else codes.setdefault(str(p), len(codes))
        for i, p in enumerate(patient_ids)
    ])
    same = ids[:, None] == ids[None, :]
    if groups is not None:
        groups = groups.detach().cpu().reshape(-1)
        same &= groups[:, None] == groups[None, :]
    return same | eye


class CMSC(Objective):
    """CMSC: adjacent segments of one recording (and recordings of one patient) are positives.

    Each record yields two adjacent segments of ``segment_seconds`` (default: half the
    record, i.e. 2 x 5 s of 10 s). Both go through ``encoder.embed`` and an optional
    projection head; the loss is a symmetric InfoNCE between first and second segments
    with cosine similarity / ``temperature`` (0.1, as in CLOCS), where the positives of a
    first segment are the second segment of the same record and of every record of the
    same patient in the batch (``Batch.patient_ids``; ``patient_positives = false`` keeps
    only the same record). The encoder must accept the shorter segment length (convolutional
    encoders such as ``resnet1d`` do).
    """

    def __init__(
        self,
        encoder: Encoder,
        spec: SignalSpec,
        segment_seconds: float | None = None,
        temperature: float = 0.1,
        patient_positives: bool = True,
        proj_dim: int = 128,
        proj_layers: int = 1,
        proj_batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if proj_layers < 0:
            raise ValueError(f"proj_layers must be >= 0 (0 = no projection head), got {proj_layers}")
        if segment_seconds is None:
            segment = spec.n_samples // 2
        else:
            if segment_seconds <= 0:
                raise ValueError(f"segment_seconds must be > 0, got {segment_seconds}")
            segment = int(round(segment_seconds * spec.sampling_rate))
        if segment < 1 or 2 * segment > spec.n_samples:
            raise ValueError(
                f"segment_seconds = {segment_seconds} gives segments of {segment} samples, but two of them must fit "
                f"in the {spec.n_samples}-sample ({spec.seconds:g} s) records; use at most {spec.seconds / 2:g} s"
            )
        self.encoder = encoder
        self.spec = spec
        self.segment = segment
        self.temperature = float(temperature)
        self.patient_positives = patient_positives
        self.head: nn.Module = (
            nn.Identity()
            if proj_layers == 0
            else ProjectionHead(encoder.embed_dim, proj_dim, None, proj_layers, proj_batch_norm)
        )

    def segment_samples(self, sampling_rate: float) -> int:
        """Segment length in samples for a batch at ``sampling_rate``."""
        if sampling_rate == self.spec.sampling_rate:
            return self.segment
        return int(round(self.segment / self.spec.sampling_rate * sampling_rate))

    def positive_mask(self, batch: Batch) -> torch.Tensor:
        """``[B, B]`` positives between first segments (rows) and second segments (columns)."""
        if not self.patient_positives:
            return torch.eye(len(batch), dtype=torch.bool)
        return patient_positive_mask(batch.patient_ids, len(batch), batch.extra.get("mixture_part"))

    def loss(self, batch: Batch, step: StepInfo) -> LossOutput:
        """Symmetric multi-positive InfoNCE between the first and second segments."""
        first, second, _ = adjacent_segments(batch.signal, self.segment_samples(batch.sampling_rate), step.generator)
        n = first.shape[0]
        h = self.encoder.embed(torch.cat([first, second]), batch.leads)
        z = self.head(h)
        z1, z2 = z[:n], z[n:]
        positives = self.positive_mask(batch)  # on the CPU: info_nce checks it there, without a host sync
        loss = 0.5 * (
            info_nce(z1, z2, positives, self.temperature)
            + info_nce(z2, z1, positives.t(), self.temperature)
        )
        extra = (positives.sum() - n).double() / n  # a CPU tensor: read by the loop at log steps
        return LossOutput(loss, {"patient_pairs_per_sample": extra}, representation=h[:n].detach())


@hookimpl
def ssl4ecg_register(registry) -> None:
    """Register objective ``cmsc``."""
    registry.add("objective", "cmsc", CMSC)
