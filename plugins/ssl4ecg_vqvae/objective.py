"""The VQ-VAE objective: a vector-quantised bottleneck on any encoder's tokens.

``encoder.tokens(x) [B, N, D]`` -> ``Linear(D, code_dim)`` -> :class:`VectorQuantizer`
(``codebook_size`` codes) -> :class:`MixerDecoder`, whose token-mixing matrix starts from the
measured token layout of the encoder (:func:`token_time_map`) and which reconstructs every
(lead, segment) of the signal. The objective works with every registered encoder (patch
transformers, ResNets, CPC encoders): it never assumes which part of the signal a token saw.

Loss = MSE(reconstruction, signal segments) + ``beta`` * commitment
(+ the codebook loss when ``ema`` is off). Every step logs ``vq_usage`` (fraction of codes used
in the last ``usage_window`` batches), ``vq_perplexity`` (batch), ``vq_perplexity_window``,
``vq_perplexity_per_position`` (codes across records at one token position: about 1 when the
codes only encode position), ``vq_restarted`` and the loss parts.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import Batch, Encoder, LossOutput, Objective, SignalSpec, StepInfo

from ssl4ecg_vqvae.quantizer import Quantized, VectorQuantizer

REPRESENTATIONS = ("quantized", "pre_quantized")
EVAL_ENCODERS = ("backbone", "quantized", "pre_quantized")


@torch.no_grad()
def token_time_map(encoder: Encoder, spec: SignalSpec, n_segments: int, segment_len: int,
                   seed: int = 0, chunk: int = 16) -> torch.Tensor:
    """How strongly each token responds to each signal segment: ``[n_segments, N]``, rows sum to 1.

    Every segment in turn (all leads) is filled with noise on an otherwise flat record and the
    squared change of every token is measured. Encoders keep their tokens local to the input
    they come from (convolutions, patch embeddings), so this finds the token layout of any
    encoder -- time-major, lead-major or with extra tokens -- without being told.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        device = next(encoder.parameters()).device if any(True for _ in encoder.parameters()) else torch.device("cpu")
        gen = torch.Generator().manual_seed(seed)
        base = torch.zeros(1, spec.n_leads, spec.n_samples)
        ref = encoder.tokens(base.to(device)).float()
        rows = []
        for start in range(0, n_segments, chunk):
            segs = range(start, min(n_segments, start + chunk))
            x = base.repeat(len(segs), 1, 1)
            for k, s_ in enumerate(segs):
                lo = s_ * segment_len
                x[k, :, lo: lo + segment_len] = torch.randn(spec.n_leads, segment_len, generator=gen)
            rows.append((encoder.tokens(x.to(device)).float() - ref).pow(2).sum(-1).cpu())
        sens = torch.cat(rows)  # [S, N]
    finally:
        encoder.train(was_training)
    total = sens.sum(dim=1, keepdim=True)
    uniform = torch.full_like(sens, 1.0 / sens.shape[1])
    return torch.where(total > 0, sens / total.clamp_min(1e-30), uniform)


class MixerDecoder(nn.Module):
    """Reconstructs ``[B, L, n_segments, segment_len]`` from quantised tokens ``[B, N, code_dim]``.

    A learned token-mixing matrix ``[n_segments, N]`` (initialised from
    :func:`token_time_map`, so each segment starts by reading the tokens that saw it) gathers
    one vector per segment; an MLP-Mixer block exchanges context between segments; a
    per-segment linear head emits the samples of every lead. Starting from the right tokens
    lets the reconstruction use the codes from the first steps -- a decoder that first has to
    discover where each token comes from rewards constant codes meanwhile, which is one of the
    ways codebooks collapse.
    """

    def __init__(self, code_dim: int, dim: int, n_tokens: int, n_leads: int, n_segments: int,
                 segment_len: int, mixing_init: torch.Tensor | None = None, depth: int = 1) -> None:
        super().__init__()
        self.n_leads, self.n_segments, self.segment_len = n_leads, n_segments, segment_len
        self.inp = nn.Linear(code_dim, dim)
        init = mixing_init if mixing_init is not None else torch.full((n_segments, n_tokens), 1.0 / n_tokens)
        if tuple(init.shape) != (n_segments, n_tokens):
            raise ValueError(f"mixing_init must be [{n_segments}, {n_tokens}], got {tuple(init.shape)}")
        self.mix = nn.Parameter(init.clone().float())
        self.blocks = nn.ModuleList(_MixerBlock(dim, n_segments) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_leads * segment_len)

    def forward(self, tokens: torch.Tensor, lead_index: Sequence[int]) -> torch.Tensor:
        """Segments of the leads ``lead_index`` (rows of the spec): ``[B, len(lead_index), S, seg]``."""
        if tokens.shape[1] != self.mix.shape[1]:
            raise ConfigError(
                f"objective 'vqvae': the encoder gave {tokens.shape[1]} tokens, the decoder was built "
                f"for {self.mix.shape[1]} (records must have the length the objective was built for)."
            )
        h = torch.einsum("sn,bnd->bsd", self.mix, self.inp(tokens))
        for block in self.blocks:
            h = block(h)
        out = self.head(self.norm(h))  # [B, S, L * seg]
        b = out.shape[0]
        out = out.reshape(b, self.n_segments, self.n_leads, self.segment_len).transpose(1, 2)
        return out[:, list(lead_index)]


class _MixerBlock(nn.Module):
    """MLP-Mixer block over ``[B, S, dim]``: segment mixing, then channel MLP (both residual)."""

    def __init__(self, dim: int, n_segments: int, ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        hidden_s = max(8, int(n_segments * ratio))
        self.token_mlp = nn.Sequential(nn.Linear(n_segments, hidden_s), nn.GELU(), nn.Linear(hidden_s, n_segments))
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * ratio)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Mix across segments, then across channels."""
        h = h + self.token_mlp(self.norm1(h).transpose(1, 2)).transpose(1, 2)
        return h + self.channel_mlp(self.norm2(h))


class QuantizedEncoder(Encoder):
    """An encoder whose tokens are the VQ-VAE's projected (optionally quantised) tokens.

    ``mode="pre_quantized"`` gives ``proj(encoder.tokens(x))``; ``"quantized"`` replaces every
    token by its nearest code. ``embed`` is the mean over tokens (``embed_dim = code_dim``).
    """

    def __init__(self, encoder: Encoder, proj: nn.Module, quantizer: VectorQuantizer, mode: str) -> None:
        super().__init__()
        if mode not in ("quantized", "pre_quantized"):
            raise ValueError(f"mode must be 'quantized' or 'pre_quantized', got {mode!r}")
        self.encoder, self.proj, self.quantizer, self.mode = encoder, proj, quantizer, mode
        self.spec = encoder.spec
        self.embed_dim = quantizer.dim

    def tokens(self, x: torch.Tensor, leads: Sequence[str] | None = None) -> torch.Tensor:
        """Projected (and for ``quantized``, code-replaced) tokens ``[B, N, code_dim]``."""
        z = self.proj(self.encoder.tokens(x, leads)).float()
        if self.mode == "pre_quantized":
            return z
        b, n, d = z.shape
        flat = z.reshape(-1, d)
        with torch.no_grad():
            from ssl4ecg_vqvae.quantizer import nearest_codes

            codes = nearest_codes(flat, self.quantizer.codebook.float())
        return F.embedding(codes, self.quantizer.codebook.float()).reshape(b, n, d)


def count_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``exp`` of the entropy of the code distribution given by ``counts`` ``[K]``, as a 0-dim tensor.

    The value of :func:`ssl4ecg_vqvae.quantizer.perplexity` (1 = one code, K = uniform, 0 for no
    counts) computed on ``counts``' device without a host sync.
    """
    counts = counts.float()
    total = counts.sum()
    p = counts / total
    entropy = -torch.xlogy(p, p).sum()  # 0 log 0 = 0
    return torch.where(total > 0, entropy.exp(), torch.zeros_like(entropy))


def position_perplexity(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Mean over token positions of the perplexity of the codes the batch's records use there.

    ``codes`` is ``[B, N]``. Near 1 when codes only encode *where* a token is (every record gets
    the same code at a position) although the overall perplexity may be high: the check that
    the codebook carries content, not just position. A 0-dim tensor on ``codes``' device.
    """
    b, n = codes.shape
    onehot = torch.zeros(n, codebook_size, device=codes.device)
    onehot.scatter_add_(1, codes.t().contiguous(), torch.ones(n, b, device=codes.device))
    p = onehot / b
    ent = -(p * p.clamp_min(1e-12).log()).sum(dim=1)
    return ent.exp().mean()


class VQVAEObjective(Objective):
    """VQ-VAE on encoder tokens with k-means init, EMA codebook and dead-code restarts.

    Options: ``codebook_size`` (K) codes of ``code_dim``; ``beta`` the commitment weight;
    ``ema`` / ``decay`` EMA codebook updates; ``kmeans_init`` / ``kmeans_iters``;
    ``restarts`` / ``dead_after`` dead-code restarts (codes unused for that many steps); ``usage_window`` batches for the
    usage log; ``segment_ms`` the length of a reconstructed segment; ``decoder_dim``,
    ``decoder_depth`` the decoder size; ``norm_target`` standardises each
    target segment; ``freeze_encoder`` trains only projection, codebook and decoder (the
    project report's setting); ``representation`` is what ``LossOutput.representation``
    holds (the mean over tokens of the ``quantized`` or ``pre_quantized`` vectors);
    ``eval_encoder`` what evaluators score: the ``backbone`` encoder's own embedding, or
    the mean of the ``quantized`` / ``pre_quantized`` tokens.
    """

    def __init__(
        self,
        encoder: Encoder,
        spec: SignalSpec | None = None,
        codebook_size: int = 256,
        code_dim: int = 64,
        normalize: bool = False,
        beta: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        restarts: bool = True,
        dead_after: int = 20,
        usage_window: int = 50,
        segment_ms: float = 200.0,
        decoder_dim: int = 128,
        decoder_depth: int = 1,
        norm_target: bool = False,
        freeze_encoder: bool = False,
        representation: str = "quantized",
        eval_encoder: str = "backbone",
    ) -> None:
        super().__init__()
        spec = spec if spec is not None else encoder.spec
        if representation not in REPRESENTATIONS:
            raise ConfigError(f"objective 'vqvae': key 'representation' must be one of {list(REPRESENTATIONS)}, got {representation!r}.")
        if eval_encoder not in EVAL_ENCODERS:
            raise ConfigError(f"objective 'vqvae': key 'eval_encoder' must be one of {list(EVAL_ENCODERS)}, got {eval_encoder!r}.")
        if beta < 0:
            raise ConfigError(f"objective 'vqvae': key 'beta' must be >= 0, got {beta!r}.")
        segment_len = int(round(segment_ms * spec.sampling_rate / 1000.0))
        if segment_len < 1 or segment_len > spec.n_samples:
            raise ConfigError(
                f"objective 'vqvae': key 'segment_ms' = {segment_ms} gives {segment_len} samples at "
                f"{spec.sampling_rate:g} Hz; it must be between 1 sample and the record ({spec.n_samples})."
            )
        self.encoder = encoder
        self.spec = spec
        self.segment_len = segment_len
        self.n_segments = spec.n_samples // segment_len
        self.beta = float(beta)
        self.norm_target = bool(norm_target)
        self.freeze_encoder = bool(freeze_encoder)
        self.representation = representation
        self.eval_encoder = eval_encoder
        if self.freeze_encoder:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
        self.proj = nn.Linear(encoder.embed_dim, code_dim)
        self.quantizer = VectorQuantizer(
            codebook_size, code_dim, ema=ema, decay=decay, kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters, restarts=restarts, dead_after=dead_after,
            usage_window=usage_window, normalize=normalize,
        )
        mixing = token_time_map(encoder, spec, self.n_segments, segment_len)
        self.decoder = MixerDecoder(code_dim, decoder_dim, mixing.shape[1], spec.n_leads,
                                    self.n_segments, segment_len, mixing, decoder_depth)

    # ------------------------------------------------------------------ pieces

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """The signal cut into segments ``[B, L, n_segments, segment_len]`` (remainder dropped)."""
        b, l, _ = x.shape
        seg = x[..., : self.n_segments * self.segment_len].reshape(b, l, self.n_segments, self.segment_len)
        if self.norm_target:
            seg = (seg - seg.mean(-1, keepdim=True)) / (seg.var(-1, keepdim=True) + 1e-6).sqrt()
        return seg

    def encode(self, x: torch.Tensor, leads: Sequence[str] | None) -> torch.Tensor:
        """Projected encoder tokens ``[B, N, code_dim]`` (float32)."""
        if self.freeze_encoder:
            with torch.no_grad():
                tokens = self.encoder.tokens(x, leads)
        else:
            tokens = self.encoder.tokens(x, leads)
        # no cast before the projection: under autocast the encoder's backward then receives
        # gradients in the dtype its forward produced
        return self.proj(tokens).float()

    def quantize(self, z: torch.Tensor, generator: torch.Generator | None = None) -> Quantized:
        """Quantise ``z`` ``[B, N, d]`` (float32, outside autocast); shapes of the fields follow ``z``."""
        b, n, d = z.shape
        device_type = z.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            q = self.quantizer(z.reshape(-1, d), generator)
        return Quantized(q.quantized_st.reshape(b, n, d), q.quantized.reshape(b, n, d),
                         q.codes.reshape(b, n), q.commitment, q.codebook_loss)

    # ------------------------------------------------------------------ Objective

    def loss(self, batch: Batch, step: StepInfo) -> LossOutput:
        """Reconstruction + commitment (+ codebook) loss of one batch, with codebook logs."""
        x = batch.signal
        leads = tuple(batch.leads)
        if any(lead not in self.spec.leads for lead in leads):
            raise ConfigError(f"objective 'vqvae' was built for leads {list(self.spec.leads)}, got {list(leads)}")
        lead_index = [self.spec.leads.index(lead) for lead in leads]
        enc_leads = None if leads == tuple(self.spec.leads) else leads
        z = self.encode(x, enc_leads)
        q = self.quantize(z, step.generator)
        recon = self.decoder(q.quantized_st, lead_index)
        target = self.targets(x).float()
        rec_loss = F.mse_loss(recon.float(), target)
        loss = rec_loss + self.beta * q.commitment + q.codebook_loss
        with torch.no_grad():  # 0-dim tensors, read by the loop at log steps (no host sync per step)
            logs = self._codebook_logs(q, rec_loss)
        pooled = (q.quantized if self.representation == "quantized" else z).mean(dim=1)
        return LossOutput(loss=loss, logs=logs, representation=pooled.detach())

    def _codebook_logs(self, q: Quantized, rec_loss: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """The step's logs: losses, batch / window / per-position perplexities and code usage."""
        counts = torch.bincount(q.codes.flatten(), minlength=self.quantizer.codebook_size).float()
        window = self.quantizer.hits.sum(0)  # code counts over the usage window (what usage() reads)
        return {
            "vq_recon": rec_loss.detach(),
            "vq_commit": q.commitment.detach(),
            "vq_perplexity": count_perplexity(counts),
            "vq_usage": (window > 0).float().mean(),
            "vq_perplexity_window": count_perplexity(window),
            "vq_batch_usage": (counts > 0).float().mean(),
            "vq_perplexity_per_position": position_perplexity(q.codes, self.quantizer.codebook_size),
            "vq_restarted": float(self.quantizer.last_restarted),  # a Python int, set in after_step
        }

    def after_step(self, step: StepInfo) -> None:
        """Apply the EMA codebook update and restart dead codes (once per optimiser step)."""
        self.quantizer.update(step.generator)

    def representation_encoder(self) -> Encoder:
        """The backbone (default) or the projected / quantised token encoder (``eval_encoder``)."""
        if self.eval_encoder == "backbone":
            return self.encoder
        return QuantizedEncoder(self.encoder, self.proj, self.quantizer, self.eval_encoder)

    def train(self, mode: bool = True) -> "VQVAEObjective":
        """Train mode, keeping a frozen encoder in eval mode (no dropout / batch-norm updates)."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self
