"""The ECG-JEPA encoder: a ViT over (lead, time-slot) patches with Cross-Pattern Attention.

Token layout (the reference's): each lead is cut into ``n_slots = n_samples // patch_size``
non-overlapping patches; token ``k = lead * n_slots + slot`` (lead-major). One Linear patch
embedding is shared by all leads; a fixed 2-D sin-cos embedding (time in the first half
of the channels, lead in the second) is added before every block. CroPA lets token
``(lead i, slot t)`` attend to ``(lead i', slot t')`` iff ``i == i'`` or ``t == t'``; the
blocks get a :class:`~ssl4ecg.nn.attention_cropa.CroPAGrid` (shape only, no mask tensor)
and compute it without the ``N x N`` product (see :mod:`ssl4ecg.nn.attention_cropa`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ssl4ecg.errors import ConfigError, DataError
from ssl4ecg.interfaces import Encoder, SignalSpec
from ssl4ecg.nn.attention_cropa import CroPAGrid, cropa_mask  # noqa: F401 - cropa_mask is re-exported
from ssl4ecg.nn.posembed import sincos_2d
from ssl4ecg.nn.transformer import (
    Block,
    drop_path_rates,
    init_transformer_weights_,
    rescale_residual_branches_,
)


#: what ``CroPAViT.embed`` may pool
POOLINGS = ("mean", "lead_mean")


class CroPAViT(Encoder):
    """ECG-JEPA's ViT encoder over lead x time patches with Cross-Pattern Attention (Kim 2024).

    Options: ``dim`` token width, ``depth`` blocks, ``heads`` attention heads, ``mlp_ratio``,
    ``patch_size`` samples per patch, ``qkv_bias``, ``drop_path`` (stochastic depth of the
    last block; rates rise linearly from 0 over the blocks), ``cropa`` (False = full
    attention, the paper's ablation) and ``pos_every_block`` (add the positional embedding
    before every block as the reference does; False = once, before the first block).
    ``pool`` chooses what ``embed`` returns: ``"mean"`` (the paper: the mean over all tokens
    after the final LayerNorm, ``dim`` wide) or ``"lead_mean"`` (each lead's mean token,
    concatenated in the encoder's lead order, ``n_leads * dim`` wide; leads absent from the
    input are zeros, so reduced-lead inputs keep the width).
    """

    def __init__(
        self,
        spec: SignalSpec,
        dim: int = 768,
        depth: int = 12,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        patch_size: int = 50,
        qkv_bias: bool = False,
        drop_path: float = 0.1,
        cropa: bool = True,
        pos_every_block: bool = True,
        pool: str = "mean",
    ) -> None:
        super().__init__()
        _check_geometry(spec, dim, depth, heads, patch_size, drop_path)
        if pool not in POOLINGS:
            raise ConfigError(f"[encoder] pool = {pool!r} is not one of {', '.join(POOLINGS)}")
        self.spec = spec
        self.dim = dim
        self.pool = pool
        self.embed_dim = dim if pool == "mean" else dim * spec.n_leads
        self.depth = depth
        self.heads = heads
        self.mlp_ratio = mlp_ratio
        self.patch_size = patch_size
        self.qkv_bias = qkv_bias
        self.drop_path = drop_path
        self.cropa = cropa
        self.pos_every_block = pos_every_block
        self.n_slots = spec.n_samples // patch_size

        self.patch_embed = nn.Linear(patch_size, dim)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rate)
            for rate in drop_path_rates(drop_path, depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        # fixed, so not part of the state_dict: [n_leads, n_slots, dim], lead index = row in spec.leads
        pos = sincos_2d(range(spec.n_leads), range(self.n_slots), dim)
        self.register_buffer("pos_embed", pos.view(spec.n_leads, self.n_slots, dim), persistent=False)

        init_transformer_weights_(self)
        rescale_residual_branches_(self.blocks)

    # ------------------------------------------------------------------ public API
    def tokens(self, x: torch.Tensor, leads: Sequence[str] | None = None) -> torch.Tensor:
        """All tokens ``[B, len(leads) * n_slots, dim]``, lead-major, after the final LayerNorm."""
        lead_index = self._checked_leads(x, leads)
        batch, n_leads = x.shape[0], len(lead_index)
        patches = x.reshape(batch, n_leads * self.n_slots, self.patch_size)
        pos = self._lead_pos(lead_index).reshape(n_leads * self.n_slots, self.dim)
        return self._encode(self.patch_embed(patches), pos, self._attention_grid(n_leads, self.n_slots))

    def embed(self, x: torch.Tensor, leads: Sequence[str] | None = None) -> torch.Tensor:
        """The pooled representation ``[B, embed_dim]`` (see ``pool``)."""
        tokens = self.tokens(x, leads)
        if self.pool == "mean":
            return tokens.mean(dim=1)
        lead_index = self._checked_leads(x, leads)
        per_lead = tokens.reshape(x.shape[0], len(lead_index), self.n_slots, self.dim).mean(dim=2)
        out = per_lead.new_zeros(x.shape[0], self.spec.n_leads, self.dim)
        out[:, lead_index] = per_lead
        return out.reshape(x.shape[0], self.embed_dim)

    def context_tokens(
        self,
        x: torch.Tensor,
        visible_slots: torch.Tensor,
        leads: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Tokens of the visible time slots only ``[B, len(leads) * S_vis, dim]`` (the student path).

        ``visible_slots`` is a LongTensor ``[S_vis]`` shared by the batch (the reference) or
        ``[B, S_vis]`` per sample. Output is lead-major with each lead's slots in the order
        given. Masked slots never enter the computation; CroPA is restricted to the visible
        grid, and each token keeps the positional embedding of its true (lead, slot).
        """
        lead_index = self._checked_leads(x, leads)
        batch, n_leads = x.shape[0], len(lead_index)
        visible = self._checked_slots(visible_slots, batch).to(x.device)
        n_visible = visible.shape[-1]
        patches = x.reshape(batch, n_leads, self.n_slots, self.patch_size)
        lead_pos = self._lead_pos(lead_index)  # [L, S, D]
        if visible.dim() == 1:
            patches = patches.index_select(2, visible)
            pos = lead_pos.index_select(1, visible).reshape(n_leads * n_visible, self.dim)
        else:
            take = visible[:, None, :, None]
            patches = patches.gather(2, take.expand(batch, n_leads, n_visible, self.patch_size))
            pos = lead_pos.unsqueeze(0).expand(batch, -1, -1, -1)
            pos = pos.gather(2, take.expand(batch, n_leads, n_visible, self.dim))
            pos = pos.reshape(batch, n_leads * n_visible, self.dim)
        h = self.patch_embed(patches.reshape(batch, n_leads * n_visible, self.patch_size))
        return self._encode(h, pos, self._attention_grid(n_leads, n_visible))

    # ------------------------------------------------------------------ internals
    def _encode(self, h: torch.Tensor, pos: torch.Tensor, attn_mask: CroPAGrid | None) -> torch.Tensor:
        if not self.pos_every_block:
            h = h + pos
        for block in self.blocks:
            h = block(h + pos if self.pos_every_block else h, attn_mask)
        return self.norm(h)

    def _attention_grid(self, n_leads: int, n_slots: int) -> CroPAGrid | None:
        """What the blocks get as ``attn_mask``: the CroPA pattern of the grid (no tensor), or None."""
        return CroPAGrid(n_leads, n_slots) if self.cropa else None

    def _attention_mask(self, n_leads: int, n_slots: int, device: torch.device) -> torch.Tensor | None:
        """The dense CroPA bool mask of an ``n_leads x n_slots`` grid (cached per geometry and device).

        The blocks do not use it (they get :meth:`_attention_grid`); it is the mask every
        CroPA path is equivalent to.
        """
        return CroPAGrid(n_leads, n_slots).dense_mask(device) if self.cropa else None

    def _lead_pos(self, lead_index: list[int]) -> torch.Tensor:
        if lead_index == list(range(self.spec.n_leads)):
            return self.pos_embed
        return self.pos_embed[torch.as_tensor(lead_index, device=self.pos_embed.device)]

    def _checked_leads(self, x: torch.Tensor, leads: Sequence[str] | None) -> list[int]:
        lead_index = self.lead_indices(leads)
        expected = (len(lead_index), self.spec.n_samples)
        if x.dim() != 3 or tuple(x.shape[1:]) != expected:
            raise DataError(
                f"CroPAViT expects signals [batch, {expected[0]} leads, {expected[1]} samples] "
                f"(leads {[self.spec.leads[i] for i in lead_index]}), got {tuple(x.shape)}. "
                f"Crop/resample the data to {self.spec.n_samples} samples at "
                f"{self.spec.sampling_rate:g} Hz or rebuild the encoder for this length."
            )
        return lead_index

    def _checked_slots(self, visible_slots: torch.Tensor, batch: int) -> torch.Tensor:
        if not isinstance(visible_slots, torch.Tensor) or visible_slots.dtype != torch.long:
            raise ValueError("visible_slots must be a LongTensor of slot indices")
        if visible_slots.dim() not in (1, 2) or (visible_slots.dim() == 2 and visible_slots.shape[0] != batch):
            raise ValueError(
                f"visible_slots must be [S_vis] or [batch={batch}, S_vis], got {tuple(visible_slots.shape)}"
            )
        if visible_slots.numel() == 0 or visible_slots.shape[-1] == 0:
            raise ValueError("visible_slots is empty: the context encoder needs at least one visible slot")
        # value check on CPU only: on an accelerator it would cost a device sync every step
        if visible_slots.device.type == "cpu" and (
            int(visible_slots.min()) < 0 or int(visible_slots.max()) >= self.n_slots
        ):
            raise ValueError(f"visible_slots must lie in [0, {self.n_slots}), got {visible_slots.tolist()}")
        return visible_slots


def _check_geometry(spec: SignalSpec, dim: int, depth: int, heads: int, patch_size: int, drop_path: float) -> None:
    if patch_size <= 0 or spec.n_samples % patch_size != 0:
        raise ConfigError(
            f"[encoder] patch_size={patch_size} must divide the signal length n_samples={spec.n_samples} "
            f"({spec.seconds:g} s at {spec.sampling_rate:g} Hz). Choose a divisor (the paper: 2500 samples, "
            f"patch_size 50) or change the crop length in [data]."
        )
    if depth < 1:
        raise ConfigError(f"[encoder] depth must be at least 1, got {depth}.")
    if heads < 1 or dim % heads != 0:
        raise ConfigError(f"[encoder] dim={dim} must be divisible by heads={heads}.")
    if dim % 4 != 0:
        raise ConfigError(f"[encoder] dim={dim} must be divisible by 4 (2-D sin-cos positional embedding).")
    if not 0.0 <= drop_path < 1.0:
        raise ConfigError(f"[encoder] drop_path must be in [0, 1), got {drop_path}.")
