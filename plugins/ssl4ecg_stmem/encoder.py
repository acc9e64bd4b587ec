"""The ST-MEM encoder: a ViT over per-lead patches with SEP tokens and lead embeddings.

Layout of the token sequence (for ``L`` leads and ``n = crop_samples // patch_size`` patches
per lead), lead-major::

    [SEP, p_1 .. p_n, SEP]_lead0  [SEP, p_1 .. p_n, SEP]_lead1  ...   -> L * (n + 2) tokens

Every token gets ``lead_embedding[lead]``; patches get a fixed 1-D sin-cos time embedding and
the SEP tokens (one shared learnable vector) get their own positions (see ``sep_position``).
All leads form one sequence with full attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import STANDARD_LEADS, Encoder, SignalSpec
from ssl4ecg.nn.posembed import sincos_1d
from ssl4ecg.nn.transformer import Block, drop_path_rates

SEP_POSITIONS = ("ends", "zero")
POOLINGS = ("mean_norm", "norm_mean")


def sep_position_table(n_patches: int, dim: int, sep_position: str) -> torch.Tensor:
    """Fixed positional table ``[n_patches + 2, dim]``: row 0 left SEP, rows 1..n patches, row n+1 right SEP.

    ``"ends"``: a sin-cos grid over ``n + 2`` positions, so the SEP tokens sit at positions 0
    and ``n + 1`` and the two ends of a lead are distinguishable. ``"zero"``: patches get
    ``sincos_1d(0..n-1)`` and both SEP rows are zero (what the public ST-MEM code does).
    """
    if sep_position == "ends":
        return sincos_1d(torch.arange(n_patches + 2), dim)
    zeros = torch.zeros(1, dim)
    return torch.cat([zeros, sincos_1d(torch.arange(n_patches), dim), zeros], dim=0)


def init_mae_weights_(module: nn.Module) -> None:
    """MAE/ST-MEM initialisation in place: Xavier-uniform Linear weights, zero biases, LayerNorm 1/0."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.xavier_uniform_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


def crop_starts(length: int, crop: int, n_crops: int) -> list[int]:
    """Start indices of ``n_crops`` evenly spaced crops of ``crop`` samples in ``length`` (first and last included).

    One crop is the centre crop.
    """
    if n_crops == 1:
        return [(length - crop) // 2]
    span = length - crop
    return [round(i * span / (n_crops - 1)) for i in range(n_crops)]


@dataclass
class VisibleEncoding:
    """Encoder output for the visible patches of a masked batch (the MAE path).

    ``tokens`` ``[B, L, K + 2, D]`` after the final norm: per lead the left SEP, the ``K``
    kept patches in time order, the right SEP. ``keep_index`` ``[B, L, K]`` gives the patch
    index of each kept slot and ``valid`` ``[B, L, K]`` marks the slots that hold a real
    patch (rows with fewer visible patches than ``K`` are padded). ``pooled`` ``[B, D]`` is
    the encoder's pooled representation of the visible patches.
    """

    tokens: torch.Tensor
    keep_index: torch.Tensor
    valid: torch.Tensor
    pooled: torch.Tensor


class STMEMEncoder(Encoder):
    """ST-MEM ViT (Na et al., ICLR 2024): per-lead patches, SEP tokens, lead embeddings, full attention.

    Options: ``dim``/``depth``/``heads`` (ViT-B 768/12/12), ``patch_size`` (75 samples),
    ``crop_samples`` (model input length, 2250 = 9 s at 250 Hz), ``n_test_crops`` (crops
    averaged by :meth:`embed` for longer inputs), ``qkv_bias``, ``mlp_ratio``, ``drop_path``
    (maximum stochastic-depth rate, rising linearly over the blocks), ``sep_position``
    (``"ends"`` or ``"zero"``, see :func:`sep_position_table`) and ``pool`` (``"mean_norm"``:
    final LayerNorm of the mean of the non-SEP tokens, as the reference encoder does;
    ``"norm_mean"``: mean of the final-normed non-SEP tokens).
    """

    def __init__(
        self,
        spec: SignalSpec | None = None,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        patch_size: int = 75,
        crop_samples: int = 2250,
        n_test_crops: int = 3,
        qkv_bias: bool = True,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        sep_position: str = "ends",
        pool: str = "mean_norm",
    ) -> None:
        super().__init__()
        if spec is None:
            spec = SignalSpec(STANDARD_LEADS, 250.0, crop_samples)
        _check_positive("encoder", dim=dim, heads=heads, patch_size=patch_size,
                        crop_samples=crop_samples, n_test_crops=n_test_crops)
        if depth < 0:
            raise ConfigError(f"[encoder] depth must be >= 0, got {depth}")
        if dim % 2 or dim % heads:
            raise ConfigError(
                f"[encoder] dim = {dim} must be even and divisible by heads = {heads}"
            )
        if crop_samples % patch_size:
            raise ConfigError(
                f"[encoder] crop_samples = {crop_samples} is not a multiple of patch_size = {patch_size}"
            )
        if spec.n_samples < crop_samples:
            raise ConfigError(
                f"[encoder] crop_samples = {crop_samples} is longer than the data's {spec.n_samples} "
                f"samples; lower crop_samples or give longer records in [data]"
            )
        if not 0.0 <= drop_path < 1.0:
            raise ConfigError(f"[encoder] drop_path must be in [0, 1), got {drop_path}")
        if mlp_ratio <= 0:
            raise ConfigError(f"[encoder] mlp_ratio must be > 0, got {mlp_ratio}")
        if sep_position not in SEP_POSITIONS:
            raise ConfigError(f"[encoder] sep_position = {sep_position!r} is not one of {SEP_POSITIONS}")
        if pool not in POOLINGS:
            raise ConfigError(f"[encoder] pool = {pool!r} is not one of {POOLINGS}")

        self.spec = spec
        self.embed_dim = dim
        self.dim, self.depth, self.heads = dim, depth, heads
        self.patch_size, self.crop_samples = patch_size, crop_samples
        self.n_patches = crop_samples // patch_size
        self.n_test_crops = n_test_crops
        self.mlp_ratio = mlp_ratio
        self.sep_position, self.pool = sep_position, pool

        # patch embedding shared by all leads: LayerNorm -> Linear -> LayerNorm
        self.patch_norm_in = nn.LayerNorm(patch_size)
        self.patch_proj = nn.Linear(patch_size, dim)
        self.patch_norm_out = nn.LayerNorm(dim)
        self.register_buffer(
            "pos_embed", sep_position_table(self.n_patches, dim, sep_position), persistent=False
        )
        # 1-D parameters, so the loop's "no weight decay on 1-D parameters" rule covers them
        self.sep_embed = nn.Parameter(torch.zeros(dim))
        self.lead_embed = nn.ParameterList(nn.Parameter(torch.zeros(dim)) for _ in spec.leads)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rate)
            for rate in drop_path_rates(drop_path, depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """ST-MEM initialisation: Xavier Linear weights, N(0, 0.02) SEP and lead embeddings."""
        init_mae_weights_(self)
        nn.init.normal_(self.sep_embed, std=0.02)
        for param in self.lead_embed:
            nn.init.normal_(param, std=0.02)

    # ------------------------------------------------------------------ geometry helpers
    @property
    def tokens_per_lead(self) -> int:
        """Tokens per lead in the full sequence: ``n_patches`` plus the two SEP tokens."""
        return self.n_patches + 2

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, crop_samples]`` -> ``[B, L, n_patches, patch_size]`` (non-overlapping patches)."""
        if x.shape[-1] != self.crop_samples:
            raise ConfigError(
                f"ST-MEM patchify expects {self.crop_samples} samples ([encoder] crop_samples), got {x.shape[-1]}"
            )
        return x.reshape(*x.shape[:-1], self.n_patches, self.patch_size)

    def patch_embed(self, patches: torch.Tensor) -> torch.Tensor:
        """``[B, L, n, patch_size]`` -> ``[B, L, n, dim]`` via LayerNorm -> Linear -> LayerNorm."""
        return self.patch_norm_out(self.patch_proj(self.patch_norm_in(patches)))

    def _check_input(self, x: torch.Tensor, leads: Sequence[str] | None) -> list[int]:
        if x.ndim != 3:
            raise ConfigError(f"ST-MEM encoder expects signals [batch, leads, samples], got shape {tuple(x.shape)}")
        index = self.lead_indices(leads)
        if x.shape[1] != len(index):
            raise ConfigError(
                f"ST-MEM encoder got {x.shape[1]} lead rows but {len(index)} lead names "
                f"({list(leads) if leads is not None else list(self.spec.leads)})"
            )
        if x.shape[-1] < self.crop_samples:
            raise ConfigError(
                f"signals have {x.shape[-1]} samples but the ST-MEM encoder needs at least "
                f"[encoder] crop_samples = {self.crop_samples}; give longer records or lower crop_samples"
            )
        return index

    def crops(self, x: torch.Tensor, n_crops: int) -> list[torch.Tensor]:
        """``n_crops`` evenly spaced ``crop_samples``-long crops of ``x`` (one crop = centre crop)."""
        length = x.shape[-1]
        if length == self.crop_samples:
            return [x]
        return [x[..., s:s + self.crop_samples] for s in crop_starts(length, self.crop_samples, n_crops)]

    # ------------------------------------------------------------------ forward passes
    def _lead_vectors(self, lead_index: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.lead_embed[i] for i in lead_index])  # [L, D]

    def _sequence(self, patch_tokens: torch.Tensor, positions: torch.Tensor, lead_index: Sequence[int]) -> torch.Tensor:
        """Add positions, wrap each lead in SEP tokens and add lead embeddings: -> ``[B, L, K + 2, D]``.

        ``patch_tokens`` ``[B, L, K, D]`` are embedded patches, ``positions`` ``[B, L, K, D]``
        their positional rows.
        """
        batch, n_leads, _, dim = patch_tokens.shape
        pos = self.pos_embed.to(patch_tokens.dtype)
        sep = self.sep_embed.to(patch_tokens.dtype)
        left = (sep + pos[0]).expand(batch, n_leads, 1, dim)
        right = (sep + pos[-1]).expand(batch, n_leads, 1, dim)
        seq = torch.cat([left, patch_tokens + positions, right], dim=2)
        return seq + self._lead_vectors(lead_index).to(seq.dtype)[None, :, None, :]

    def _blocks(self, seq: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            seq = block(seq, attn_mask)
        return seq

    def _pool(self, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Pool ``hidden`` ``[B, L, K, D]`` (pre-norm, patch tokens only) to ``[B, D]``.

        ``weight`` ``[B, L, K]`` (1 = real patch, 0 = padding) restricts the mean.
        """
        if self.pool == "norm_mean":
            hidden = self.norm(hidden)
        if weight is None:
            pooled = hidden.mean(dim=(1, 2))
        else:
            w = weight.to(hidden.dtype)[..., None]
            pooled = (hidden * w).sum(dim=(1, 2)) / w.sum(dim=(1, 2)).clamp_min(1.0)
        return self.norm(pooled) if self.pool == "mean_norm" else pooled

    def _encode_crop(self, x: torch.Tensor, lead_index: Sequence[int]) -> torch.Tensor:
        """Pre-norm hidden states ``[B, L, n + 2, D]`` of one ``crop_samples``-long crop."""
        emb = self.patch_embed(self.patchify(x))
        batch, n_leads, n, dim = emb.shape
        seq = self._sequence(emb, self.pos_embed[1:n + 1].to(emb.dtype).expand_as(emb), lead_index)
        hidden = self._blocks(seq.reshape(batch, n_leads * (n + 2), dim))
        return hidden.reshape(batch, n_leads, n + 2, dim)

    def tokens(self, x: torch.Tensor, leads: Sequence[str] | None = None) -> torch.Tensor:
        """All tokens ``[B, L * (n + 2), D]`` after the final norm, SEP tokens included (lead-major).

        Inputs longer than ``crop_samples`` are centre-cropped.
        """
        index = self._check_input(x, leads)
        crop = self.crops(x, 1)[0]
        hidden = self._encode_crop(crop, index)
        return self.norm(hidden).flatten(1, 2)

    def embed(self, x: torch.Tensor, leads: Sequence[str] | None = None) -> torch.Tensor:
        """Pooled representation ``[B, dim]`` of the non-SEP tokens (see ``pool``).

        Inputs longer than ``crop_samples`` are embedded as the mean over ``n_test_crops``
        evenly spaced crops (the paper's test-time multi-crop averaging).
        """
        index = self._check_input(x, leads)
        crops = self.crops(x, self.n_test_crops)
        stacked = torch.cat(crops, dim=0)
        pooled = self._pool(self._encode_crop(stacked, index)[:, :, 1:-1])
        return pooled.reshape(len(crops), x.shape[0], -1).mean(dim=0)

    def encode_visible(
        self, patches: torch.Tensor, visible: torch.Tensor, leads: Sequence[str] | None = None
    ) -> VisibleEncoding:
        """Encode only the visible patches (MAE path).

        ``patches`` ``[B, L, n, patch_size]``; ``visible`` bool ``[B, L, n]`` (True = visible).
        Each lead keeps its own visible patches (in time order) between its two SEP tokens.
        When rows have different numbers of visible patches they are padded to the largest
        and the padding is hidden from attention.
        """
        index = self.lead_indices(leads)
        batch, n_leads, n, _ = patches.shape
        if visible.shape != (batch, n_leads, n) or n != self.n_patches or n_leads != len(index):
            raise ConfigError(
                f"ST-MEM encode_visible: patches {tuple(patches.shape)} and mask {tuple(visible.shape)} do not "
                f"match {len(index)} leads x {self.n_patches} patches of {self.patch_size} samples"
            )
        # the shapes depend on the counts: read them from the mask where it was drawn (a CPU mask
        # costs no device sync), then move it
        host_counts = visible.to(torch.bool).sum(dim=-1)
        k = int(host_counts.max())
        uniform = bool((host_counts == k).all())
        visible = visible.to(device=patches.device, dtype=torch.bool, non_blocking=True)
        counts = host_counts.to(patches.device, non_blocking=True)  # [B, L]
        order = torch.argsort((~visible).to(torch.int8), dim=-1, stable=True)  # visible first, time order
        keep_index = order[..., :k]
        valid = torch.arange(k, device=patches.device) < counts[..., None]

        emb = self.patch_embed(patches)
        dim = emb.shape[-1]
        gather = keep_index[..., None].expand(-1, -1, -1, dim)
        kept = torch.gather(emb, 2, gather)
        positions = self.pos_embed[1:n + 1].to(emb.dtype)[keep_index]
        seq = self._sequence(kept, positions, index)  # [B, L, k + 2, D]

        attn_mask = None
        if not uniform:
            ends = torch.ones(batch, n_leads, 1, dtype=torch.bool, device=patches.device)
            key_ok = torch.cat([ends, valid, ends], dim=2).reshape(batch, 1, 1, n_leads * (k + 2))
            attn_mask = key_ok
        hidden = self._blocks(seq.reshape(batch, n_leads * (k + 2), dim), attn_mask)
        hidden = hidden.reshape(batch, n_leads, k + 2, dim)
        pooled = self._pool(hidden[:, :, 1:-1], valid)
        return VisibleEncoding(self.norm(hidden), keep_index, valid, pooled)


def _check_positive(section: str, **values: int) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(f"[{section}] {key} must be > 0, got {value}")
