"""Projection heads: the small MLPs contrastive methods put between encoder and loss."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """An MLP ``in_dim -> hidden_dim -> ... -> out_dim`` (SimCLR's projection head g).

    ``num_layers`` linear layers; every layer but the last is followed by batch norm (when
    ``batch_norm``) and ReLU. ``num_layers = 1`` is a single linear map. ``last_bn`` adds an
    affine-free batch norm after the last layer (as in SimCLR v2 / MoCo v3). ``hidden_dim``
    defaults to ``in_dim``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 128,
        hidden_dim: int | None = None,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_bn: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"projection head num_layers must be >= 1, got {num_layers}")
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"projection head dimensions must be positive, got in {in_dim}, out {out_dim}")
        hidden_dim = in_dim if hidden_dim is None else hidden_dim
        if hidden_dim < 1:
            raise ValueError(f"projection head hidden_dim must be positive, got {hidden_dim}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, in_dim]`` -> ``[N, out_dim]``."""
        return self.net(x)
