"""CPC, Contrastive Predictive Coding (Oord et al. 2018) for ECG (Mehari & Strodthoff 2022).

Registers encoder ``"cpc_encoder"`` (strided 1-D convolutions -> latent sequence z_t, and
the autoregressive context network -> c_t) and objective ``"cpc"`` (per-offset linear
predictors W_k for k = 1..K, InfoNCE against other time steps and other samples). See
``docs/methods/cpc.md``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssl4ecg import hookimpl
from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import Batch, Encoder, LossOutput, Objective, SignalSpec, StepInfo
from ssl4ecg.nn.conv_encoders import ConvEncoder
from ssl4ecg.nn.losses import float32_region


class ContextNetwork(nn.Module):
    """The autoregressive g_ar: a unidirectional LSTM or GRU over z_t giving c_t.

    The recurrence runs in float32 on every device, autocast off: errors of a bf16 state
    compound over hundreds of time steps (c_t is float32 under autocast too).
    """

    def __init__(self, input_dim: int, hidden_dim: int, num_layers: int, kind: str) -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = rnn(input_dim, hidden_dim, num_layers=num_layers, batch_first=True)
        self.output_dim = hidden_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z [B, T', D]`` -> ``c [B, T', H]`` float32 (c_t sees z_1..z_t only)."""
        with float32_region(z.device):
            return self.rnn(z.float())[0]


class CPCEncoder(ConvEncoder):
    """CPC's g_enc (1-D convolutions -> latents z_t) and g_ar (LSTM/GRU -> contexts c_t).

    g_enc: ``features``, ``kernel_sizes`` and ``strides`` list one entry per convolution
    (each followed by batch norm, when ``batch_norm``, and ReLU). The default (four 1x1
    convolutions, 512 channels, stride 1) is the ECG setting of Mehari & Strodthoff: one
    latent per input sample. ``strides = [5, 4, 2, 2, 2]``, ``kernel_sizes = [10, 8, 4, 4, 4]``
    with five 512 entries is Oord et al.'s audio encoder. g_ar: ``context`` (lstm | gru)
    with ``context_dim`` units in ``context_layers`` layers.

    tokens = the latent sequence z ``[B, T / prod(strides), features[-1]]``;
    :meth:`contexts` = c ``[B, T', context_dim]``; embed = the mean over time of c
    (``embed_from = "context"``, what CPC fine-tunes downstream) or of z (``"latent"``).
    The context network lives in the encoder so that the saved encoder is what is scored.
    """

    def __init__(
        self,
        spec: SignalSpec,
        features: Sequence[int] = (512, 512, 512, 512),
        kernel_sizes: Sequence[int] = (1, 1, 1, 1),
        strides: Sequence[int] = (1, 1, 1, 1),
        batch_norm: bool = True,
        context: str = "lstm",
        context_dim: int = 512,
        context_layers: int = 2,
        embed_from: str = "context",
    ) -> None:
        super().__init__(spec)
        if not (len(features) == len(kernel_sizes) == len(strides)) or len(features) == 0:
            raise ValueError(
                f"features, kernel_sizes and strides need one entry per layer and the same length; got "
                f"{len(features)}, {len(kernel_sizes)}, {len(strides)}"
            )
        for key, values in (("features", features), ("kernel_sizes", kernel_sizes), ("strides", strides)):
            if any((not isinstance(v, int)) or v < 1 for v in values):
                raise ValueError(f"{key} must be positive integers, got {list(values)}")
        if context not in ("lstm", "gru"):
            raise ValueError(f"context must be 'lstm' or 'gru', got {context!r}")
        if embed_from not in ("context", "latent"):
            raise ValueError(f"embed_from must be 'context' or 'latent', got {embed_from!r}")
        for key, value in (("context_dim", context_dim), ("context_layers", context_layers)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        layers: list[nn.Module] = []
        in_ch = spec.n_leads
        for f, k, s in zip(features, kernel_sizes, strides):
            layers.append(nn.Conv1d(in_ch, f, k, stride=s, padding=(k - 1) // 2, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(f))
            layers.append(nn.ReLU(inplace=True))
            in_ch = f
        self.layers = nn.Sequential(*layers)
        self.latent_dim = in_ch
        self.context_network = ContextNetwork(in_ch, context_dim, context_layers, context)
        self.embed_from = embed_from
        self.embed_dim = context_dim if embed_from == "context" else in_ch
        self.downsampling = 1
        for s in strides:
            self.downsampling *= s

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, n_leads, T]`` -> z ``[B, features[-1], T']``."""
        return self.layers(x)

    def contexts(self, x: torch.Tensor, leads: Sequence[str] | None = None) -> torch.Tensor:
        """Context sequence c ``[B, T', context_dim]``."""
        return self.context_network(self.tokens(x, leads))

    def embed(self, x: torch.Tensor, leads: Sequence[str] | None = None) -> torch.Tensor:
        """Mean over time of c (``embed_from = "context"``) or of z (``"latent"``)."""
        if self.embed_from == "context":
            return self.contexts(x, leads).mean(dim=1)
        return super().embed(x, leads)


def random_crops(x: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """A random window of ``length`` samples from every record of ``x [B, L, T]`` (start per sample)."""
    b, n_leads, n = x.shape
    if length >= n:
        return x
    start = torch.randint(0, n - length + 1, (b,), generator=generator).to(x.device, non_blocking=True)
    index = start[:, None] + torch.arange(length, device=x.device)
    return x.gather(2, index[:, None, :].expand(b, n_leads, length))


class CPC(Objective):
    """CPC: predict z_{t+k} from c_t with W_k (k = 1..prediction_steps), InfoNCE over candidates.

    z and c come from the encoder (``cpc_encoder``: its tokens and its context network).
    For every offset k and time t the candidates are the true z_{t+k} and ``num_negatives``
    latents drawn uniformly from all (sample, time) positions of the batch (other time steps
    of the same record and other records; one draw per offset shared by all predictions; a
    draw that hits a prediction's own positive is left out of its softmax).
    ``num_negatives = 0`` uses every position of the batch. Scores are ``z . W_k c_t /
    temperature`` (``normalize = true``: cosine), computed in float32 with autocast off.
    The loss is the mean over offsets; ``logs["accuracy"]`` (a 0-dim tensor) is the share
    of predictions whose positive scores highest. Records are randomly cropped to
    ``crop_seconds`` first (Mehari & Strodthoff: 2.5 s; 0 = whole records).
    """

    def __init__(
        self,
        encoder: Encoder,
        spec: SignalSpec,
        prediction_steps: int = 12,
        num_negatives: int = 128,
        temperature: float = 1.0,
        normalize: bool = False,
        crop_seconds: float = 2.5,
    ) -> None:
        super().__init__()
        context = getattr(encoder, "context_network", None)
        if not isinstance(context, nn.Module):
            raise ValueError(
                f"objective 'cpc' needs an encoder with a context network (g_ar), i.e. [encoder] name = "
                f"\"cpc_encoder\"; {type(encoder).__name__} has none"
            )
        for key, value, low in (("prediction_steps", prediction_steps, 1), ("num_negatives", num_negatives, 0)):
            if value < low:
                raise ValueError(f"{key} must be >= {low}, got {value}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if crop_seconds < 0:
            raise ValueError(f"crop_seconds must be > 0, or 0 for whole records; got {crop_seconds}")
        self.crop = spec.n_samples
        if crop_seconds > 0:
            self.crop = min(spec.n_samples, max(1, int(round(crop_seconds * spec.sampling_rate))))
        self.encoder = encoder
        self.spec = spec
        latent_dim = int(getattr(encoder, "latent_dim", encoder.embed_dim))
        self.predictors = nn.ModuleList(
            nn.Linear(context.output_dim, latent_dim, bias=False) for _ in range(prediction_steps)
        )
        self.prediction_steps = prediction_steps
        self.num_negatives = num_negatives
        self.temperature = float(temperature)
        self.normalize = normalize

    def _crop_samples(self, sampling_rate: float) -> int:
        if sampling_rate == self.spec.sampling_rate:
            return self.crop
        return int(round(self.crop / self.spec.sampling_rate * sampling_rate))

    def offset_logits(
        self, pred: torch.Tensor, z: torch.Tensor, k: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits and positive mask for offset ``k`` (autocast off; no host sync).

        ``pred [B, T'-k, D]`` are the predictions from c_0..c_{T'-k-1}; ``z [B, T', D]``.
        With sampled negatives column 0 holds the positive and columns 1.. the negatives; a
        negative draw that is the row's own positive is set to ``-inf`` (left out of the
        softmax). With ``num_negatives = 0`` the columns are all B * T' latents of the batch.
        Negatives are drawn from ``generator`` on its own device.
        """
        logits, target = self._logits_and_target(pred, z, k, generator)
        positives = torch.zeros_like(logits, dtype=torch.bool)
        positives[torch.arange(logits.shape[0], device=logits.device), target] = True
        return logits, positives

    def _logits_and_target(
        self, pred: torch.Tensor, z: torch.Tensor, k: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`offset_logits` with the positive given as a column index per row (``[N]`` long)."""
        b, n_tok, d = z.shape
        n_pred = n_tok - k
        device = z.device
        # flat index of each prediction's positive z_{t+k}
        pos_index = (
            torch.arange(b, device=device)[:, None] * n_tok + torch.arange(k, n_tok, device=device)[None, :]
        ).reshape(-1)
        with float32_region(device):
            q = pred.reshape(b * n_pred, d).float()
            z_flat = z.reshape(b * n_tok, d).float()
            if self.normalize:
                q, z_flat = F.normalize(q, dim=1), F.normalize(z_flat, dim=1)
            if self.num_negatives == 0:
                logits = q @ z_flat.t()
                target = pos_index
            else:
                neg_index = torch.randint(
                    0, b * n_tok, (self.num_negatives,), generator=generator, device=generator.device
                ).to(device, non_blocking=True)
                pos_logit = (q * z_flat[pos_index]).sum(dim=1, keepdim=True)
                neg_logits = (q @ z_flat[neg_index].t()).masked_fill(neg_index[None, :] == pos_index[:, None],
                                                                     float("-inf"))
                logits = torch.cat([pos_logit, neg_logits], dim=1)
                target = torch.zeros(logits.shape[0], dtype=torch.long, device=device)
            if self.temperature != 1.0:
                logits = logits / self.temperature
        return logits, target

    def loss(self, batch: Batch, step: StepInfo) -> LossOutput:
        """Mean over k = 1..K of InfoNCE(W_k c_t vs z_{t+k})."""
        x = random_crops(batch.signal, self._crop_samples(batch.sampling_rate), step.generator)
        z = self.encoder.tokens(x, batch.leads)  # [B, T', D]
        n_tok = z.shape[1]
        if n_tok <= self.prediction_steps:
            raise ConfigError(
                f"cpc: the encoder turns {x.shape[-1]}-sample crops into {n_tok} latent steps, but predicting "
                f"{self.prediction_steps} steps ahead needs more than {self.prediction_steps}; raise "
                f"[objective] crop_seconds or lower prediction_steps (or the encoder's strides)."
            )
        c = self.encoder.context_network(z)
        total = z.new_zeros((), dtype=torch.float32)
        correct = z.new_zeros((), dtype=torch.float32)
        for k in range(1, self.prediction_steps + 1):
            pred = self.predictors[k - 1](c[:, : n_tok - k])
            logits, target = self._logits_and_target(pred, z, k, step.device_generator)
            with float32_region(logits.device):
                total = total + F.cross_entropy(logits, target)  # InfoNCE with one positive per row
            with torch.no_grad():
                correct += (logits.argmax(dim=1) == target).float().mean()
        loss = total / self.prediction_steps
        pooled = c if getattr(self.encoder, "embed_from", "context") == "context" else z
        return LossOutput(
            loss, {"accuracy": correct / self.prediction_steps}, representation=pooled.mean(dim=1).detach()
        )


@hookimpl
def ssl4ecg_register(registry) -> None:
    """Register encoder ``cpc_encoder`` and objective ``cpc``."""
    registry.add("encoder", "cpc_encoder", CPCEncoder)
    registry.add("objective", "cpc", CPC)
