"""Shared base for convolutional encoders that see every lead as an input channel.

Convolutional encoders (:mod:`ssl4ecg.nn.resnet1d`, the CPC encoder, ...) mix all leads in
their first convolution, so they are built for a fixed lead set (``spec.leads``). To accept a
*subset* of those leads (reduced-lead evaluation) they place the given leads at their
channel positions and fill the missing lead channels with zeros. Zeros are exactly what a
per-lead standardised recording contains where a lead carries no signal, so a model trained
on all leads sees "flat" leads rather than shuffled channels. They accept any length ``T``
(the time axis is only convolved and pooled), so objectives may feed them shorter segments
(CMSC) or random crops (CPC).
"""

from __future__ import annotations

import abc
from typing import Sequence

import torch

from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import Encoder, SignalSpec


class ConvEncoder(Encoder):
    """An :class:`Encoder` over ``[B, leads, T]`` whose leads are the input channels.

    Subclasses implement :meth:`feature_map` (``[B, n_leads, T] -> [B, C, T']``);
    :meth:`tokens` returns the feature map as a sequence ``[B, T', C]`` and :meth:`embed`
    its mean over time (global average pooling). Missing leads are zero-filled.
    """

    def __init__(self, spec: SignalSpec) -> None:
        super().__init__()
        if spec.n_leads < 1:
            raise ValueError("the data has no leads; set [data] leads")
        self.spec = spec

    @abc.abstractmethod
    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, spec.n_leads, T]`` -> ``[B, C, T']``."""

    def full_leads(self, x: torch.Tensor, leads: Sequence[str] | None) -> torch.Tensor:
        """``x`` with rows for every lead of ``spec`` (missing leads zero-filled)."""
        if x.dim() != 3:
            raise ConfigError(f"{type(self).__name__} expects signals [B, leads, T], got shape {tuple(x.shape)}")
        if leads is None:
            if x.shape[1] != self.spec.n_leads:
                raise ConfigError(
                    f"{type(self).__name__} was built for {self.spec.n_leads} leads {list(self.spec.leads)} "
                    f"but got {x.shape[1]} rows; pass `leads` naming the rows of a reduced-lead input."
                )
            return x
        if len(leads) != x.shape[1]:
            raise ConfigError(f"`leads` names {len(leads)} leads but the signal has {x.shape[1]} rows")
        index = self.lead_indices(leads)
        if index == list(range(self.spec.n_leads)):
            return x
        full = x.new_zeros(x.shape[0], self.spec.n_leads, x.shape[2])
        full[:, index] = x
        return full

    def tokens(self, x: torch.Tensor, leads: Sequence[str] | None = None) -> torch.Tensor:
        """The final feature map as a sequence ``[B, T', C]``."""
        return self.feature_map(self.full_leads(x, leads)).transpose(1, 2)

    def embed(self, x: torch.Tensor, leads: Sequence[str] | None = None) -> torch.Tensor:
        """Global average pool of the final feature map, ``[B, C]``."""
        return self.feature_map(self.full_leads(x, leads)).mean(dim=2)
