"""The ECG-JEPA objective: predict the EMA teacher's tokens at masked time slots.

One step (Kim 2024, Sec. 3; the reference's ``ecg_jepa.forward``):

1. draw a time-slot mask from ``step.generator`` (masked slots are masked in all leads);
2. teacher (EMA copy of the encoder, no grad) encodes the full input; its tokens are
   layer-normed without affine parameters -- these are the targets;
3. the student (the encoder) encodes only the visible slots with CroPA restricted to them;
4. the predictor fills each lead's masked slots with mask tokens and predicts them;
5. loss = smooth L1 between predictions and targets at masked positions only;
6. after the optimiser step, ``teacher = m * teacher + (1 - m) * student`` with ``m``
   linear from ``ema_start`` to ``ema_end`` over ``StepInfo.total_steps``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ssl4ecg.errors import ConfigError, did_you_mean
from ssl4ecg.interfaces import Batch, Encoder, LossOutput, Masker, Objective, StepInfo
from ssl4ecg.nn.ema import ema_update_, linear_momentum

from ssl4ecg_jepa.masking import MultiBlockSlotMasker
from ssl4ecg_jepa.predictor import JEPAPredictor

EVALUATE_CHOICES = ("student", "teacher")
TARGET_NORMS = ("layer", "layer_batch")


def gather_slots(grid: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Select time slots from ``grid`` ``[B, L, S, D]``: ``slots`` ``[S']`` (shared) or ``[B, S']``."""
    if slots.dim() == 1:
        return grid.index_select(2, slots)
    batch, n_leads, _, dim = grid.shape
    index = slots[:, None, :, None].expand(batch, n_leads, slots.shape[1], dim)
    return grid.gather(2, index)


def layer_normed(teacher_tokens: torch.Tensor) -> torch.Tensor:
    """The JEPA targets: teacher tokens layer-normed over channels, no affine, eps 1e-5 (float32)."""
    return F.layer_norm(teacher_tokens.float(), (teacher_tokens.shape[-1],))


def batch_standardized(targets: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``targets`` ``[B, N, D]`` standardised across the batch at every (token, channel).

    What is left is what differs between the records of the batch: a target that depends only on
    the token's position (the "learns mostly position" failure of short runs) becomes zero, so
    the student is trained on the record-specific part of the teacher's output only.
    """
    centred = targets - targets.mean(dim=0, keepdim=True)
    std = (centred.square().sum(dim=0, keepdim=True) / max(1, targets.shape[0] - 1)).sqrt()
    return centred / (std + eps)


def masked_latent_loss(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    masked_slots: torch.Tensor,
    beta: float = 1.0,
) -> torch.Tensor:
    """Mean smooth-L1 between predictions and targets at the masked slots only (float32).

    ``predictions`` is ``[B, L, S_m, D]`` (predictor output at ``masked_slots``, same order);
    ``targets`` is ``[B, L * S, D]`` lead-major over all slots (:func:`layer_normed` teacher
    tokens). Targets at visible slots do not enter the loss.
    """
    batch, n_leads, _, dim = predictions.shape
    masked_targets = gather_slots(targets.view(batch, n_leads, -1, dim), masked_slots)
    return F.smooth_l1_loss(predictions.float(), masked_targets.float(), beta=beta)


def across_record_std(tokens: torch.Tensor) -> torch.Tensor:
    """Std across the batch at each (token, channel), averaged: ~0 when targets ignore the record.

    A 0-dim tensor on ``tokens``' device (no host sync; the loop reads logs at log steps).
    Written out because ``Tensor.std(dim=0)`` is ~30x slower on CPU for this layout.
    """
    centred = tokens - tokens.mean(dim=0)
    return (centred.square().sum(dim=0) / (tokens.shape[0] - 1)).sqrt().mean()


def slot_order(slot_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Visible and masked slot indices (each ascending) of ``slot_mask`` ``[R, S]`` (True = masked).

    Every row must have the same number of masked slots. Returns ``[R, S_vis]`` and ``[R, S_m]``.
    """
    n_masked = int(slot_mask[0].sum())
    order = torch.argsort(slot_mask.to(torch.uint8), dim=1, stable=True)
    return order[:, : slot_mask.shape[1] - n_masked], order[:, slot_mask.shape[1] - n_masked:]


class JEPAObjective(Objective):
    """ECG-JEPA (Kim 2024): latent prediction of masked time slots with an EMA teacher.

    Options: ``ema_start``/``ema_end`` (teacher momentum, linear over the run's
    ``total_steps``), ``predictor_dim``/``predictor_depth``/``predictor_heads``,
    ``smooth_l1_beta``, ``target_norm`` ("layer" = the paper's layer-normed teacher tokens;
    "layer_batch" = those then standardised across the batch at every token and channel,
    :func:`batch_standardized`) and ``evaluate`` ("student" = the context encoder, as the released
    checkpoints; "teacher" = the EMA encoder) choosing what evaluators score. The encoder must
    be a ``cropa_vit`` (any encoder with ``context_tokens`` and ``n_slots``); the masker
    must mask whole time slots (``multiblock`` when none is given).
    """

    def __init__(
        self,
        encoder: Encoder,
        masker: Masker | None = None,
        ema_start: float = 0.996,
        ema_end: float = 1.0,
        predictor_dim: int = 384,
        predictor_depth: int = 6,
        predictor_heads: int = 12,
        smooth_l1_beta: float = 1.0,
        target_norm: str = "layer",
        evaluate: str = "student",
    ) -> None:
        super().__init__()
        if not callable(getattr(encoder, "context_tokens", None)) or not hasattr(encoder, "n_slots"):
            raise ConfigError(
                f"[objective] jepa needs an encoder with a context path over time slots (cropa_vit); "
                f"got {type(encoder).__name__}. Set [encoder] name = \"cropa_vit\"."
            )
        if masker is not None and not callable(getattr(masker, "sample", None)):
            raise ConfigError(f"[objective] jepa needs a Masker, got {type(masker).__name__}.")
        if not (0.0 <= ema_start <= 1.0 and 0.0 <= ema_end <= 1.0):
            raise ConfigError(
                f"[objective] ema_start and ema_end must lie in [0, 1], got {ema_start} and {ema_end}."
            )
        if evaluate not in EVALUATE_CHOICES:
            raise ConfigError(
                f"[objective] evaluate = '{evaluate}' is not valid.{did_you_mean(evaluate, EVALUATE_CHOICES)}"
            )
        if predictor_dim % predictor_heads != 0 or predictor_dim % 4 != 0:
            raise ConfigError(
                f"[objective] predictor_dim={predictor_dim} must be divisible by predictor_heads="
                f"{predictor_heads} and by 4."
            )
        if smooth_l1_beta < 0:
            raise ConfigError(f"[objective] smooth_l1_beta must be >= 0, got {smooth_l1_beta}.")
        if target_norm not in TARGET_NORMS:
            raise ConfigError(
                f"[objective] target_norm must be one of {', '.join(TARGET_NORMS)}, got {target_norm!r}."
            )
        self.target_norm = target_norm
        self.encoder = encoder
        self.masker = masker if masker is not None else MultiBlockSlotMasker()
        self.ema_start = ema_start
        self.ema_end = ema_end
        self.smooth_l1_beta = smooth_l1_beta
        self.evaluate = evaluate
        self.predictor = JEPAPredictor(
            embed_dim=encoder.dim,
            n_slots=encoder.n_slots,
            dim=predictor_dim,
            depth=predictor_depth,
            heads=predictor_heads,
            mlp_ratio=getattr(encoder, "mlp_ratio", 4.0),
            qkv_bias=getattr(encoder, "qkv_bias", False),
            drop_path=getattr(encoder, "drop_path", 0.0),
        )
        self.teacher = copy.deepcopy(encoder).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "JEPAObjective":
        """Set train/eval mode; the teacher always stays in eval mode (deterministic targets)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def momentum(self, step: StepInfo) -> float:
        """EMA momentum for the update after ``step`` (``ema_start`` at step 0, ``ema_end`` at the end)."""
        return linear_momentum(self.ema_start, self.ema_end, step.progress)

    def loss(self, batch: Batch, step: StepInfo) -> LossOutput:
        """Smooth-L1 latent prediction loss for one batch (see the module docstring)."""
        x, leads = batch.signal, batch.leads
        n_slots = self.encoder.n_slots
        mask = self.masker.sample(x.shape[0], len(leads), n_slots, step.generator)
        visible, masked = self._slot_indices(mask, x.shape[0], len(leads), n_slots)
        visible, masked = visible.to(x.device, non_blocking=True), masked.to(x.device, non_blocking=True)

        with torch.no_grad():
            teacher_tokens = self.teacher.tokens(x, leads)
        context = self.encoder.context_tokens(x, visible, leads)
        predictions = self.predictor(context, visible, masked, n_leads=len(leads))
        normed = layer_normed(teacher_tokens)
        targets = normed
        if self.target_norm == "layer_batch":
            if x.shape[0] < 2:
                raise ConfigError("[objective] target_norm = 'layer_batch' needs batches of at least 2 records.")
            targets = batch_standardized(normed)
        loss = masked_latent_loss(predictions, targets, masked, beta=self.smooth_l1_beta)

        with torch.no_grad():
            logs = {
                "mask_ratio": masked.shape[-1] / n_slots,
                "ema_momentum": self.momentum(step),
            }
            if x.shape[0] > 1:  # spread across records at a fixed position: the collapse signal
                logs["target_std"] = across_record_std(normed)
            if self.evaluate == "teacher":
                representation = teacher_tokens.mean(dim=1)
            else:
                representation = context.detach().mean(dim=1)
        return LossOutput(loss=loss, logs=logs, representation=representation.float())

    @torch.no_grad()
    def after_step(self, step: StepInfo) -> None:
        """Move the teacher towards the student by EMA with this step's momentum."""
        ema_update_(self.teacher, self.encoder, self.momentum(step))

    def representation_encoder(self) -> Encoder:
        """The encoder evaluators score: the student (default) or the EMA teacher."""
        return self.teacher if self.evaluate == "teacher" else self.encoder

    def _slot_indices(
        self, mask: torch.Tensor, batch: int, n_leads: int, n_slots: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Visible / masked slot indices, ``[S]`` when one mask serves the batch, else ``[B, S]``."""
        if tuple(mask.shape) != (batch, n_leads, n_slots) or mask.dtype != torch.bool:
            raise ConfigError(
                f"masker {type(self.masker).__name__} returned {tuple(mask.shape)} {mask.dtype}; jepa "
                f"needs a bool mask [batch={batch}, leads={n_leads}, slots={n_slots}]."
            )
        slot_mask = mask[:, 0]
        if not bool((mask == slot_mask[:, None]).all()):
            raise ConfigError(
                f"masker {type(self.masker).__name__} masks different slots in different leads; jepa "
                f"masks whole time slots across all leads. Use masker 'random' or 'multiblock'."
            )
        shared = bool((slot_mask == slot_mask[:1]).all())
        rows = slot_mask[:1] if shared else slot_mask
        n_masked = rows.sum(dim=1)
        if not bool((n_masked == n_masked[0]).all()):
            raise ConfigError(
                f"masker {type(self.masker).__name__} left different numbers of visible slots per sample; "
                f"jepa needs equal counts across the batch (per_sample maskers equalise them)."
            )
        if int(n_masked[0]) in (0, n_slots):
            raise ConfigError(
                f"masker {type(self.masker).__name__} masked {int(n_masked[0])} of {n_slots} slots; jepa needs "
                f"at least one masked and one visible slot."
            )
        visible, masked = slot_order(rows)
        return (visible[0], masked[0]) if shared else (visible, masked)
