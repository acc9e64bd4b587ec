"""The ECG-JEPA predictor: a narrow transformer that works on each lead separately.

The student's visible tokens ``[B, L * S_vis, D]`` are projected to the predictor width,
split into one sequence per lead (row ``b * L + lead``), followed by learnable mask tokens
for the masked slots. A fixed time-only sin-cos embedding of each position's true slot is
added before every block; there is no attention mask and no attention across leads. The
output is normed and projected back to the encoder width.
"""

from __future__ import annotations

import torch
from torch import nn

from ssl4ecg.nn.posembed import sincos_2d_time_only
from ssl4ecg.nn.transformer import Block, drop_path_rates, init_transformer_weights_, rescale_residual_branches_


class JEPAPredictor(nn.Module):
    """Per-lead predictor of the teacher's tokens at masked time slots (Kim 2024, Sec. 3.2).

    ``embed_dim`` is the encoder width, ``dim``/``depth``/``heads`` the predictor's own
    (paper: 384 / 6 / 12), ``n_slots`` the time slots per lead.
    """

    def __init__(
        self,
        embed_dim: int,
        n_slots: int,
        dim: int = 384,
        depth: int = 6,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.dim = dim
        self.n_slots = n_slots
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rate)
            for rate in drop_path_rates(drop_path, depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.proj = nn.Linear(dim, embed_dim)
        self.register_buffer("pos_embed", sincos_2d_time_only(range(n_slots), dim), persistent=False)

        init_transformer_weights_(self)
        rescale_residual_branches_(self.blocks)
        with torch.no_grad():
            nn.init.trunc_normal_(self.mask_token, std=0.02, a=-2.0, b=2.0)

    def forward(
        self,
        context: torch.Tensor,
        visible_slots: torch.Tensor,
        masked_slots: torch.Tensor,
        n_leads: int,
        only_masked: bool = True,
    ) -> torch.Tensor:
        """Predicted encoder tokens ``[B, L, S_m, embed_dim]`` at ``masked_slots``.

        ``context`` is ``[B, L * S_vis, embed_dim]`` as returned by the encoder's
        ``context_tokens`` for ``visible_slots``; slot indices are ``[S]`` (shared by the
        batch) or ``[B, S]`` (per sample), in the order of the context / targets. With
        ``only_masked=False`` the output covers every position, ``[B, L, S_vis + S_m, D]``,
        visible slots first (the reference's layout).
        """
        batch = context.shape[0]
        n_visible, n_masked = visible_slots.shape[-1], masked_slots.shape[-1]
        if context.shape[1] != n_leads * n_visible:
            raise ValueError(
                f"context has {context.shape[1]} tokens, expected {n_leads} leads x {n_visible} visible slots"
            )
        rows = batch * n_leads
        h = self.embed(context).reshape(rows, n_visible, self.dim)
        h = torch.cat([h, self.mask_token.to(h.dtype).expand(rows, n_masked, self.dim)], dim=1)
        order = torch.cat([visible_slots, masked_slots], dim=-1).to(self.pos_embed.device)
        # [1, 1, S', dim] shared by the batch, or [B, 1, S', dim] per sample; broadcast over leads
        pos = self.pos_embed[order].reshape(-1, 1, n_visible + n_masked, self.dim)
        grid = (batch, n_leads, n_visible + n_masked, self.dim)
        for block in self.blocks:
            h = block((h.view(grid) + pos).view(rows, -1, self.dim))
        if only_masked:
            h = h[:, n_visible:]
        return self.proj(self.norm(h)).view(batch, n_leads, h.shape[1], self.embed_dim)
