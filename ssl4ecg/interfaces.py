"""The contracts every ssl4ecg component fulfils.

A *component* is anything a recipe can name: an :class:`Encoder`, an :class:`Objective`,
a :class:`Masker`, an :class:`Evaluator`, an :class:`Augmentation` or a data source.
Components are registered by plugins (see :mod:`ssl4ecg.hooks`) and built from recipe
sections whose keys are the keyword arguments of the component's constructor.

Two keyword arguments are never recipe keys; the builder injects them when a
constructor asks for them by name:

* ``spec`` -- the :class:`SignalSpec` of the data (leads, sampling rate, samples),
* ``encoder`` / ``masker`` -- the already-built encoder and masker (objectives only).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import nn

#: Standard 12-lead order used throughout the framework.
STANDARD_LEADS: tuple[str, ...] = (
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
)
#: The 8 independent leads ECG-JEPA uses (the other 4 are linear combinations).
JEPA_LEADS: tuple[str, ...] = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")


@dataclass(frozen=True)
class SignalSpec:
    """Geometry of the signals a model is built for: lead names, sampling rate, length."""

    leads: tuple[str, ...]
    sampling_rate: float
    n_samples: int

    @property
    def n_leads(self) -> int:
        return len(self.leads)

    @property
    def seconds(self) -> float:
        return self.n_samples / self.sampling_rate


@dataclass
class Batch:
    """A batch of ECGs as every objective, encoder and evaluator sees it.

    ``signal`` is ``[B, leads, T]`` float32; ``labels`` is ``[B, C]`` multi-hot float
    (or ``None`` for unlabelled data); ``record_ids`` and ``patient_ids`` are per sample.
    ``extra`` holds per-sample tensors a source provides (e.g. ground-truth heart rate).
    """

    signal: torch.Tensor
    leads: tuple[str, ...]
    sampling_rate: float
    labels: torch.Tensor | None = None
    record_ids: list[str] = field(default_factory=list)
    patient_ids: list[str] = field(default_factory=list)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.signal.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """The batch with its tensors on ``device`` (``non_blocking`` copies from pinned memory)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """The batch with its tensors in page-locked memory (``torch.utils.data`` calls this)."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, move) -> "Batch":
        return replace(
            self,
            signal=move(self.signal),
            labels=None if self.labels is None else move(self.labels),
            extra={k: move(v) for k, v in self.extra.items()},
        )


@dataclass(frozen=True)
class StepInfo:
    """Where training stands, passed to objectives every step.

    ``generator`` is the loop's CPU random generator for small host-side draws whose sizes
    decide shapes (masks, crop offsets, view sampling). ``device_generator`` lives on the
    batch's device and serves draws as large as the batch (augmentation noise), so nothing
    full-size is drawn on the CPU and copied; on CPU it *is* ``generator``. Objectives draw
    from these, never from global state, so that a checkpoint (which stores both states
    for every rank) resumes bit-exactly.
    """

    step: int  # optimiser steps completed before this one
    total_steps: int  # the schedule horizon (all schedules are relative to it)
    epoch: int
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    device_generator: torch.Generator | None = None  # None: use ``generator``

    def __post_init__(self) -> None:
        if self.device_generator is None:
            object.__setattr__(self, "device_generator", self.generator)

    @property
    def progress(self) -> float:
        """Fraction of the schedule done, in [0, 1]."""
        return min(1.0, self.step / max(1, self.total_steps))


@dataclass
class LossOutput:
    """What an objective returns for one batch: the loss to minimise and scalars to log.

    ``logs`` values are floats or 0-dim tensors; return tensors (detached) rather than
    calling ``float()`` / ``.item()`` on a device tensor: the loop reads them on the host
    only at logging steps, so a GPU is never stalled by a step's logs.
    """

    loss: torch.Tensor
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)
    #: optional representation [B, D] of the batch, watched by the collapse monitor
    representation: torch.Tensor | None = None


class Encoder(nn.Module, abc.ABC):
    """Maps ``[B, leads, T]`` signals to tokens ``[B, N, D]`` and a pooled embedding ``[B, D]``.

    ``leads`` names the rows of ``x``; an encoder accepts any subset of the leads it was
    built for (reduced-lead evaluation) and raises :class:`ssl4ecg.errors.ConfigError`
    for leads it does not know.
    """

    #: width of :meth:`embed`'s output
    embed_dim: int
    #: the signal geometry this encoder was built for
    spec: SignalSpec

    @abc.abstractmethod
    def tokens(self, x: torch.Tensor, leads: Sequence[str] | None = None) -> torch.Tensor:
        """Token sequence ``[B, N, D]`` (after any final norm)."""

    def embed(self, x: torch.Tensor, leads: Sequence[str] | None = None) -> torch.Tensor:
        """Pooled representation ``[B, embed_dim]`` used by evaluators (mean over tokens)."""
        return self.tokens(x, leads).mean(dim=1)

    def lead_indices(self, leads: Sequence[str] | None) -> list[int]:
        """Indices of ``leads`` within ``self.spec.leads`` (all leads when ``None``)."""
        from ssl4ecg.errors import ConfigError

        if leads is None:
            return list(range(self.spec.n_leads))
        unknown = [lead for lead in leads if lead not in self.spec.leads]
        if unknown:
            raise ConfigError(
                f"encoder {type(self).__name__} was built for leads {list(self.spec.leads)}; "
                f"it cannot take {unknown}. Select those leads in [data] leads or rebuild the encoder."
            )
        return [self.spec.leads.index(lead) for lead in leads]


class Masker(abc.ABC):
    """Draws boolean masks over a ``(lead, slot)`` token grid; ``True`` means *masked*.

    ``sample`` returns ``[batch_size, n_leads, n_slots]``. Maskers that mask whole time
    slots across all leads (ECG-JEPA) return the same row for every lead; maskers with
    ``per_batch`` semantics return the same mask for every sample.
    """

    @abc.abstractmethod
    def sample(
        self, batch_size: int, n_leads: int, n_slots: int, generator: torch.Generator
    ) -> torch.Tensor:
        """A bool mask ``[batch_size, n_leads, n_slots]``; True = masked."""


class Objective(nn.Module, abc.ABC):
    """A self-supervised training objective: owns every trainable module of a method.

    The shared loop optimises ``objective.parameters()`` that require grad, calls
    :meth:`loss` for every batch and :meth:`after_step` after every optimiser step
    (the place for EMA updates). :meth:`representation_encoder` is what evaluators score.
    """

    encoder: Encoder

    @abc.abstractmethod
    def loss(self, batch: Batch, step: StepInfo) -> LossOutput:
        """The loss for one batch (called inside autocast, in train mode)."""

    def after_step(self, step: StepInfo) -> None:
        """Called after each optimiser step, outside autocast and without grad."""

    def representation_encoder(self) -> Encoder:
        """The encoder evaluators score after pretraining (default: ``self.encoder``)."""
        return self.encoder


class Augmentation(abc.ABC):
    """A random, shape-preserving transform of a signal batch ``[B, leads, T]``."""

    @abc.abstractmethod
    def __call__(
        self, x: torch.Tensor, sampling_rate: float, generator: torch.Generator
    ) -> torch.Tensor:
        """Return the augmented batch (same shape, same dtype)."""


@dataclass
class EvalContext:
    """Everything an evaluator may need besides the encoder and the data."""

    device: torch.device
    seed: int
    out_dir: Any  # pathlib.Path of the run directory (plots may go there)
    batch_size: int = 64
    precision: str = "fp32"


class Evaluator(abc.ABC):
    """Scores a (frozen or fine-tuned) encoder on labelled data.

    ``evaluate`` receives the encoder and a :class:`ssl4ecg.data.records.RecordSet` with
    ``train``/``val``/``test`` splits and returns a flat-ish dict of metrics, e.g.
    ``{"auc_macro": 0.91, "f1_macro": 0.7, "auc_per_class": {...}}``. Anything chosen
    (epochs, thresholds, regularisation) is chosen on ``val``; ``test`` is scored once.
    """

    #: a short protocol description stored with the metrics (compare refuses to mix protocols)
    def protocol(self) -> dict[str, Any]:
        return {"evaluator": type(self).__name__}

    @abc.abstractmethod
    def evaluate(self, encoder: Encoder, records: Any, context: EvalContext) -> dict[str, Any]:
        """Metrics for ``encoder`` on ``records`` (see class docstring)."""


class DataSource(abc.ABC):
    """Reads one dataset into a :class:`ssl4ecg.data.records.RecordSet` of raw records.

    Sources only read; resampling, lead selection, filtering, normalisation and cropping
    are applied afterwards by :mod:`ssl4ecg.data.preprocess` from the ``[data]`` recipe.
    """

    @abc.abstractmethod
    def load(self) -> Any:
        """All records of the dataset as a RecordSet (signals may be ragged in time)."""
