"""The ST-MEM objective: masked patch reconstruction with a lightweight lead-wise decoder."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import Batch, Encoder, LossOutput, Masker, Objective, StepInfo
from ssl4ecg.nn.transformer import Block

from ssl4ecg_stmem.encoder import STMEMEncoder, VisibleEncoding, init_mae_weights_, sep_position_table
from ssl4ecg_stmem.masker import STMEMRandomMasker


def masked_patch_mse(
    pred: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor, norm_target: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Mean squared error over the masked patches only.

    ``pred`` and ``patches`` are ``[B, L, n, patch_size]``, ``mask`` bool ``[B, L, n]`` (True =
    masked). With ``norm_target`` each target patch is standardised by its own mean and
    (unbiased) variance: ``(t - mean) / sqrt(var + eps)`` (MAE's ``norm_pix_loss``). The
    error is averaged over the samples of a patch, then over the masked patches.
    """
    target = patches.float()
    if norm_target:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


class STMEMDecoder(nn.Module):
    """Lightweight decoder shared by all leads; each lead is decoded as its own sequence.

    Encoder tokens are projected to ``dim``; a learnable mask token fills every masked patch
    slot; fixed sin-cos positions (same SEP convention as the encoder) are added, optionally
    a learnable per-lead embedding, then ``depth`` blocks, a LayerNorm (eps 1e-6) and a
    Linear head that predicts the ``patch_size`` raw samples of each patch.
    """

    def __init__(
        self,
        encoder_dim: int,
        dim: int,
        depth: int,
        heads: int,
        n_patches: int,
        patch_size: int,
        n_leads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        sep_position: str = "ends",
        lead_embed: bool = False,
    ) -> None:
        super().__init__()
        self.n_patches = n_patches
        self.proj = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.register_buffer("pos_embed", sep_position_table(n_patches, dim, sep_position), persistent=False)
        self.lead_embed = (
            nn.ParameterList(nn.Parameter(torch.zeros(dim)) for _ in range(n_leads)) if lead_embed else None
        )
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, patch_size)
        init_mae_weights_(self)
        with torch.no_grad():
            nn.init.normal_(self.mask_token, std=0.02)
            for param in self.lead_embed or ():
                nn.init.normal_(param, std=0.02)

    def forward(self, encoded: VisibleEncoding, visible: torch.Tensor, lead_index: Sequence[int]) -> torch.Tensor:
        """Predicted patches ``[B, L, n, patch_size]`` from the visible-patch encoding.

        ``visible`` bool ``[B, L, n]`` is the mask the encoding was made with (True = visible).
        """
        y = self.proj(encoded.tokens)  # [B, L, K + 2, d]
        batch, n_leads, _, dim = y.shape
        n = self.n_patches
        kept = y[:, :, 1:-1]
        mask_tok = self.mask_token.to(y.dtype).expand(batch, n_leads, n, dim)
        if kept.shape[2] == 0:
            full = mask_tok
        else:
            # slot s of a lead takes the kept token whose rank among visible slots is s's rank
            rank = (visible.long().cumsum(dim=-1) - 1).clamp_min(0)
            gathered = torch.gather(kept, 2, rank[..., None].expand(-1, -1, -1, dim))
            full = torch.where(visible[..., None], gathered, mask_tok)
        pos = self.pos_embed.to(y.dtype)
        seq = torch.cat([y[:, :, :1] + pos[0], full + pos[1:n + 1], y[:, :, -1:] + pos[-1]], dim=2)
        if self.lead_embed is not None:
            leads = torch.stack([self.lead_embed[i] for i in lead_index]).to(seq.dtype)
            seq = seq + leads[None, :, None, :]
        seq = seq.reshape(batch * n_leads, n + 2, dim)
        for block in self.blocks:
            seq = block(seq)
        out = self.head(self.norm(seq))[:, 1:-1]
        return out.reshape(batch, n_leads, n, -1)


class STMEMObjective(Objective):
    """ST-MEM (Na et al., ICLR 2024): reconstruct randomly masked per-lead patches from the visible ones.

    Each step takes a random ``crop_samples``-long crop of every record (offsets drawn from
    the loop's generator), masks patches with ``masker`` (default ``stmem_random``, 75 %
    per sample and lead), encodes only the visible patches, decodes all of them with a
    lightweight decoder (``decoder_dim``/``decoder_depth``/``decoder_heads``) shared by all
    leads, and minimises the MSE on the masked patches (per-patch normalised targets when
    ``norm_target``). ``decoder_lead_embed`` adds a learnable lead embedding in the decoder
    (off in the reference code, where lead identity reaches the decoder only through the
    encoder's tokens).
    """

    def __init__(
        self,
        encoder: Encoder | None = None,
        masker: Masker | None = None,
        decoder_dim: int = 256,
        decoder_depth: int = 4,
        decoder_heads: int = 4,
        norm_target: bool = True,
        decoder_lead_embed: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, STMEMEncoder):
            raise ConfigError(
                f"[objective] stmem needs [encoder] name = \"stmem_vit\", got {type(encoder).__name__}"
            )
        for key, value in (("decoder_dim", decoder_dim), ("decoder_depth", decoder_depth),
                           ("decoder_heads", decoder_heads)):
            if value <= 0:
                raise ConfigError(f"[objective] {key} must be > 0, got {value}")
        if decoder_dim % 2 or decoder_dim % decoder_heads:
            raise ConfigError(
                f"[objective] decoder_dim = {decoder_dim} must be even and divisible by decoder_heads = {decoder_heads}"
            )
        self.encoder = encoder
        self.masker = masker if masker is not None else STMEMRandomMasker()
        self.norm_target = norm_target
        self.decoder = STMEMDecoder(
            encoder.embed_dim, decoder_dim, decoder_depth, decoder_heads,
            n_patches=encoder.n_patches, patch_size=encoder.patch_size, n_leads=encoder.spec.n_leads,
            mlp_ratio=encoder.mlp_ratio, sep_position=encoder.sep_position, lead_embed=decoder_lead_embed,
        )

    def random_crop(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random ``crop_samples``-long crop of each record of ``x`` ``[B, L, T]`` (offsets from ``generator``)."""
        crop = self.encoder.crop_samples
        length = x.shape[-1]
        if length < crop:
            raise ConfigError(
                f"records have {length} samples but ST-MEM needs [encoder] crop_samples = {crop}; "
                f"lower crop_samples or give longer records in [data]"
            )
        if length == crop:
            return x
        starts = torch.randint(0, length - crop + 1, (x.shape[0],), generator=generator)
        starts = starts.to(x.device, non_blocking=True)  # no host sync: the draw lives on the host
        index = starts[:, None] + torch.arange(crop, device=x.device)[None, :]
        return torch.gather(x, 2, index[:, None, :].expand(-1, x.shape[1], -1))

    def sample_mask(self, batch_size: int, n_leads: int, generator: torch.Generator) -> torch.Tensor:
        """The masker's bool mask ``[B, L, n_patches]`` (True = masked), checked for shape."""
        mask = self.masker.sample(batch_size, n_leads, self.encoder.n_patches, generator)
        if mask.shape != (batch_size, n_leads, self.encoder.n_patches) or mask.dtype != torch.bool:
            raise ConfigError(
                f"[masker] {type(self.masker).__name__} returned {tuple(mask.shape)} {mask.dtype}; ST-MEM needs a "
                f"bool mask [{batch_size}, {n_leads}, {self.encoder.n_patches}]"
            )
        return mask

    def predict(
        self, x: torch.Tensor, mask: torch.Tensor, leads: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted patches ``[B, L, n, patch_size]`` and pooled representation ``[B, D]``.

        ``x`` is ``[B, L, crop_samples]``; ``mask`` bool ``[B, L, n]`` (True = masked).
        """
        lead_index = self.encoder.lead_indices(leads)
        visible = ~mask.to(dtype=torch.bool)  # where the masker drew it (the CPU): shapes come from it
        encoded = self.encoder.encode_visible(self.encoder.patchify(x), visible, leads)
        visible = visible.to(x.device, non_blocking=True)
        return self.decoder(encoded, visible, lead_index), encoded.pooled

    def loss(self, batch: Batch, step: StepInfo) -> LossOutput:
        """Masked-patch reconstruction loss for one batch."""
        x = self.random_crop(batch.signal, step.generator)
        mask = self.sample_mask(x.shape[0], x.shape[1], step.generator)
        pred, pooled = self.predict(x, mask, batch.leads)
        mask_dev = mask.to(x.device, non_blocking=True)
        loss = masked_patch_mse(pred, self.encoder.patchify(x), mask_dev, self.norm_target)
        return LossOutput(
            loss=loss,
            logs={"mask_ratio": mask.float().mean()},  # a tensor: read by the loop at log steps
            representation=pooled.detach().float(),
        )
