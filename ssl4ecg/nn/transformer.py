"""Pre-norm transformer blocks with a boolean attention-mask argument.

These are the blocks every ViT-style method in ssl4ecg shares (ECG-JEPA, ST-MEM, ...).
Submodule names follow the common ViT layout (``norm1``, ``attn.qkv``, ``attn.proj``,
``norm2``, ``mlp.fc1``, ``mlp.fc2``) so that reference checkpoints map onto them by
renaming prefixes only.

Masks are boolean with ``True`` = *may attend*, broadcastable to ``[B, heads, N, N]``,
and go to :func:`torch.nn.functional.scaled_dot_product_attention`; a
:class:`~ssl4ecg.nn.attention_cropa.CroPAGrid` in their place selects the mask-free
Cross-Pattern Attention paths of :mod:`ssl4ecg.nn.attention_cropa`.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from ssl4ecg.nn.attention_cropa import CroPAGrid, cropa_attention, packed_sdpa


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection and an output ``proj``.

    ``qkv`` output channels ``[0:D]`` are the queries, ``[D:2D]`` the keys and ``[2D:3D]``
    the values; head ``j`` uses channels ``j*dh:(j+1)*dh`` of each (``dh = D // heads``).
    Logits are scaled by ``dh ** -0.5``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | CroPAGrid | None = None) -> torch.Tensor:
        """Attend over ``x`` ``[B, N, D]``.

        ``attn_mask`` is a bool tensor (True = query may attend key) broadcastable to
        ``[B, heads, N, N]``, or a :class:`~ssl4ecg.nn.attention_cropa.CroPAGrid`, which
        computes the same masked attention without a mask tensor (see that module).
        """
        qkv = self.qkv(x)
        if isinstance(attn_mask, CroPAGrid):
            out = cropa_attention(qkv, self.num_heads, attn_mask)
        else:
            out = packed_sdpa(qkv, self.num_heads, attn_mask)
        return self.proj(out)


class Mlp(nn.Module):
    """Two-layer feed-forward network ``fc2(GELU(fc1(x)))`` with the exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the feed-forward network token-wise."""
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch per sample with probability ``rate``.

    Kept samples are scaled by ``1 / (1 - rate)`` so the expectation is unchanged; in eval
    mode (or with ``rate == 0``) this is the identity.
    """

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop-path rate must be in [0, 1), got {rate}")
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop whole samples of the branch output ``x`` (first dim = sample)."""
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``+ mlp(norm2(.))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | CroPAGrid | None = None) -> torch.Tensor:
        """One block over ``x`` ``[B, N, D]`` with an optional mask (bool, True = may attend, or a CroPAGrid)."""
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def drop_path_rates(max_rate: float, depth: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 (first block) to ``max_rate`` (last).

    Same values as ``torch.linspace(0, max_rate, depth)``; a single block gets 0. More than
    100,000 blocks is refused (ValueError) rather than listed: the list alone would exhaust memory.
    """
    if depth > 100_000:
        raise ValueError(f"depth = {depth} blocks cannot be built (at most 100,000); lower depth")
    if depth <= 1:
        return [0.0] * depth
    return [max_rate * i / (depth - 1) for i in range(depth)]


@torch.no_grad()
def init_transformer_weights_(module: nn.Module, std: float = 0.02) -> None:
    """ViT initialisation in place: truncated-normal(``std``) Linear weights, zero biases, LayerNorm 1/0.

    The truncation bounds are +-2 (absolute), as in the common ViT/I-JEPA code.
    """
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.trunc_normal_(sub.weight, std=std, a=-2.0, b=2.0)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            if sub.weight is not None:
                nn.init.ones_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


@torch.no_grad()
def rescale_residual_branches_(blocks: Iterable[Block]) -> None:
    """Divide each block's ``attn.proj`` and ``mlp.fc2`` weights by ``sqrt(2 * layer_id)``.

    ``layer_id`` counts from 1, so deeper blocks start with smaller residual updates
    (the I-JEPA / ECG-JEPA ``fix_init_weight`` rule).
    """
    for layer_id, block in enumerate(blocks, start=1):
        block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
        block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))
