"""Clinical-feature preprocessing and the fusion head of the hybrid probe.

:class:`ClinicalPreprocessor` turns the raw clinical feature matrix (NaN = not measurable) into
a dense, standardised input: angles become (sin, cos), every column that can be missing gets a
0/1 missing indicator, missing values are imputed with the train median, values are scaled by
the train median and inter-quartile range (robust to measurement outliers) and clipped.
Everything is fitted on the train split only.

:class:`FusionHead` combines a frozen encoder's embedding with those features: each branch is
normalised (LayerNorm) and projected to ``hidden`` units, then either concatenated into an MLP
(``fusion="concat"``) or mixed by a learned per-unit gate (``fusion="gated"``:
``g * e + (1 - g) * c`` with ``g = sigmoid(W [e; c])``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

FUSIONS = ("concat", "gated")
#: standardised clinical values are clipped to this range
CLIP = 5.0


@dataclass
class ClinicalPreprocessor:
    """Train-fitted transform of clinical features ``[N, F]`` (NaN allowed) to dense inputs."""

    names: list[str]
    medians: np.ndarray = field(default_factory=lambda: np.zeros(0))
    centers: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scales: np.ndarray = field(default_factory=lambda: np.ones(0))
    keep: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    indicators: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    missing_indicators: bool = True

    @staticmethod
    def expand_angles(x: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Replace every ``*_deg`` column by its sine and cosine (NaN stays NaN)."""
        cols, out_names = [], []
        for j, name in enumerate(names):
            if name.endswith("_deg"):
                rad = np.radians(x[:, j].astype(np.float64))
                cols += [np.sin(rad), np.cos(rad)]
                out_names += [name[:-4] + "_sin", name[:-4] + "_cos"]
            else:
                cols.append(x[:, j].astype(np.float64))
                out_names.append(name)
        return np.stack(cols, axis=1) if cols else np.zeros((len(x), 0)), out_names

    @classmethod
    def fit(cls, x_train: np.ndarray, names: Sequence[str], missing_indicators: bool = True) -> "ClinicalPreprocessor":
        """Fit medians, robust scales and the indicator columns on the train features."""
        x, expanded = cls.expand_angles(np.asarray(x_train), names)
        finite = np.isfinite(x)
        keep = finite.any(axis=0)  # a column never measured in train carries nothing to learn
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                medians = np.nanmedian(np.where(finite, x, np.nan), axis=0)
                q1, q3 = np.nanpercentile(x, [25, 75], axis=0)
        medians = np.where(np.isfinite(medians), medians, 0.0)
        iqr = q3 - q1
        scales = np.where(np.isfinite(iqr) & (iqr > 1e-9), iqr / 1.349, 1.0)  # IQR of a unit normal
        indicators = (~finite).any(axis=0) & keep if missing_indicators else np.zeros(len(expanded), bool)
        return cls(names=list(expanded), medians=medians, centers=medians, scales=scales, keep=keep,
                   indicators=indicators, missing_indicators=missing_indicators)

    def transform(self, x_raw: np.ndarray, names: Sequence[str]) -> np.ndarray:
        """Dense float32 inputs: standardised, imputed values of kept columns, then indicators."""
        x, expanded = self.expand_angles(np.asarray(x_raw), names)
        if expanded != self.names:
            raise ValueError("clinical feature columns differ from the ones the preprocessor was fitted on")
        missing = ~np.isfinite(x)
        filled = np.where(missing, self.medians[None, :], x)
        z = np.clip((filled - self.centers) / self.scales, -CLIP, CLIP)
        parts = [z[:, self.keep], missing[:, self.indicators].astype(np.float64)]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def output_names(self) -> list[str]:
        """Column names of :meth:`transform`'s output."""
        kept = [n for n, k in zip(self.names, self.keep) if k]
        return kept + [f"{n}_missing" for n, i in zip(self.names, self.indicators) if i]


class FusionHead(nn.Module):
    """Classifier on an embedding and/or clinical inputs (either branch may be absent, ``dim = 0``)."""

    def __init__(self, embed_dim: int, clinical_dim: int, n_classes: int, hidden: int = 128,
                 fusion: str = "gated", dropout: float = 0.1) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if embed_dim <= 0 and clinical_dim <= 0:
            raise ValueError("the fusion head needs at least one input branch")
        self.fusion = fusion
        self.embed = self._branch(embed_dim, hidden) if embed_dim > 0 else None
        self.clinical = self._branch(clinical_dim, hidden) if clinical_dim > 0 else None
        both = self.embed is not None and self.clinical is not None
        self.gate = nn.Linear(2 * hidden, hidden) if both and fusion == "gated" else None
        width = 2 * hidden if both and fusion == "concat" else hidden
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, n_classes))

    @staticmethod
    def _branch(dim: int, hidden: int) -> nn.Module:
        return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU())

    def forward(self, emb: torch.Tensor | None, clin: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[B, n_classes]``."""
        e = self.embed(emb) if self.embed is not None else None
        c = self.clinical(clin) if self.clinical is not None else None
        if e is None or c is None:
            h = e if e is not None else c
        elif self.gate is not None:
            g = torch.sigmoid(self.gate(torch.cat([e, c], dim=1)))
            h = g * e + (1.0 - g) * c
        else:
            h = torch.cat([e, c], dim=1)
        return self.out(h)
