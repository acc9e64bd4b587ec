"""ECG augmentations: random, shape-preserving transforms of a batch ``[B, leads, T]``.

Each augmentation is a registered component of kind ``"augmentation"``; its recipe keys are
its constructor arguments. Every one takes ``p``, the probability that it is applied to a
given sample (drawn independently per sample), and a strength option. All randomness comes
from the ``generator`` passed to ``__call__`` (objectives pass the loop's
``StepInfo.device_generator``), so a resumed run reproduces the same views. Every number is
drawn on the generator's own device (a CUDA generator draws on the GPU: no full-size noise is
made on the CPU and copied) and moved to the batch's device only when the two differ. Random
parameters are drawn for every sample even when ``p < 1`` (and then discarded), so the draws
do not depend on which samples were hit.

Amplitudes are in signal units; the framework's data are standardised per lead, so
``std = 0.05`` means 5 % of a lead's standard deviation.

Objectives build a pipeline from a recipe list of tables with :func:`build_augmentations`::

    augmentations = [
        {name = "baseline_shift", p = 0.5, max_shift = 0.5},
        {name = "gaussian_noise", p = 0.5, std = 0.05},
    ]
"""

from __future__ import annotations

import abc
import math
from typing import Any, Sequence

import torch

from ssl4ecg.errors import ConfigError, did_you_mean
from ssl4ecg.interfaces import Augmentation, SignalSpec


def _check_probability(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p}")
    return float(p)


def _check_nonneg(key: str, value: float) -> float:
    if value < 0:
        raise ValueError(f"{key} must be >= 0, got {value}")
    return float(value)


def _check_range(low_key: str, low: float, high_key: str, high: float, lowest: float, highest: float) -> None:
    if not lowest <= low <= high <= highest:
        raise ValueError(
            f"need {lowest} <= {low_key} <= {high_key} <= {highest}, got {low_key} = {low}, {high_key} = {high}"
        )


def _on(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` on ``like``'s device (itself when it is there already)."""
    return t if t.device == like.device else t.to(like.device)


def _uniform(
    generator: torch.Generator, shape: Sequence[int], low: float, high: float, like: torch.Tensor
) -> torch.Tensor:
    """``U(low, high)`` of ``shape`` drawn on ``generator``'s device, on ``like``'s device (float32)."""
    u = torch.rand(tuple(shape), generator=generator, device=generator.device)
    return _on(low + (high - low) * u, like)


def _time(n: int, sampling_rate: float, like: torch.Tensor) -> torch.Tensor:
    """Sample times in seconds ``[T]`` on ``like``'s device."""
    return torch.arange(n, dtype=torch.float32, device=like.device) / float(sampling_rate)


class RandomAugmentation(Augmentation):
    """Base class: draws which samples are hit (probability ``p``) and applies :meth:`transform`."""

    def __init__(self, p: float) -> None:
        self.p = _check_probability(p)

    @abc.abstractmethod
    def transform(self, x: torch.Tensor, sampling_rate: float, generator: torch.Generator) -> torch.Tensor:
        """The transform applied to every sample of ``x`` (float32); selection happens in ``__call__``."""

    def __call__(self, x: torch.Tensor, sampling_rate: float, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"{type(self).__name__} expects a batch [B, leads, T], got shape {tuple(x.shape)}")
        if self.p == 0.0 or x.shape[0] == 0:
            return x
        hit = torch.rand(x.shape[0], generator=generator, device=generator.device) < self.p
        out = self.transform(x.float(), sampling_rate, generator).to(x.dtype)
        return torch.where(_on(hit, x).view(-1, 1, 1), out, x)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"


class BaselineShift(RandomAugmentation):
    """Add a constant offset ``U(-max_shift, max_shift)``: one per sample (all leads) or one per lead."""

    def __init__(self, p: float = 0.5, max_shift: float = 0.5, per_lead: bool = False) -> None:
        super().__init__(p)
        self.max_shift = _check_nonneg("max_shift", max_shift)
        self.per_lead = per_lead

    def transform(self, x, sampling_rate, generator):
        shape = (x.shape[0], x.shape[1] if self.per_lead else 1, 1)
        return x + _uniform(generator, shape, -self.max_shift, self.max_shift, x)


class BaselineWander(RandomAugmentation):
    """Add low-frequency drift: a sum of ``n_components`` sinusoids with frequencies in ``[min_freq, max_freq]`` Hz.

    Frequencies are drawn per sample and shared by the leads (one physical cause, e.g.
    breathing); amplitudes and phases are drawn per lead. Each component's amplitude is
    ``U(0, amplitude / n_components)``, so the drift never exceeds ``amplitude``.
    """

    def __init__(
        self,
        p: float = 0.5,
        amplitude: float = 0.5,
        min_freq: float = 0.05,
        max_freq: float = 0.5,
        n_components: int = 3,
    ) -> None:
        super().__init__(p)
        self.amplitude = _check_nonneg("amplitude", amplitude)
        if not 0 < min_freq <= max_freq:
            raise ValueError(f"need 0 < min_freq <= max_freq (Hz), got min_freq = {min_freq}, max_freq = {max_freq}")
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        self.min_freq, self.max_freq, self.n_components = float(min_freq), float(max_freq), n_components

    def transform(self, x, sampling_rate, generator):
        b, n_leads, n = x.shape
        c = self.n_components
        freq = _uniform(generator, (b, 1, c, 1), self.min_freq, self.max_freq, x)
        phase = _uniform(generator, (b, n_leads, c, 1), 0.0, 2 * math.pi, x)
        amp = _uniform(generator, (b, n_leads, c, 1), 0.0, self.amplitude / c, x)
        t = _time(n, sampling_rate, x)
        return x + (amp * torch.sin(2 * math.pi * freq * t + phase)).sum(dim=2)


class GaussianNoise(RandomAugmentation):
    """Add white Gaussian noise with standard deviation ``std``."""

    def __init__(self, p: float = 0.5, std: float = 0.05) -> None:
        super().__init__(p)
        self.std = _check_nonneg("std", std)

    def transform(self, x, sampling_rate, generator):
        return x + self.std * _on(torch.randn(tuple(x.shape), generator=generator, device=generator.device), x)


class PowerlineNoise(RandomAugmentation):
    """Add mains interference: a sinusoid at exactly ``frequency`` Hz (50 or 60).

    The phase is drawn per sample (shared by the leads), the amplitude per lead as
    ``U(0, amplitude)``. The frequency must lie below the Nyquist frequency of the data
    (checked when built for a known sampling rate, and on every call).
    """

    def __init__(
        self, p: float = 0.5, amplitude: float = 0.1, frequency: float = 50.0, spec: SignalSpec | None = None
    ) -> None:
        super().__init__(p)
        self.amplitude = _check_nonneg("amplitude", amplitude)
        if frequency <= 0:
            raise ValueError(f"frequency must be > 0 Hz, got {frequency}")
        self.frequency = float(frequency)
        if spec is not None and self._nyquist_problem(spec.sampling_rate):
            raise ValueError(self._nyquist_problem(spec.sampling_rate))

    def _nyquist_problem(self, sampling_rate: float) -> str:
        """Why ``frequency`` cannot be represented at ``sampling_rate`` ("" when it can)."""
        if self.frequency < sampling_rate / 2:
            return ""
        return (
            f"powerline_noise frequency = {self.frequency:g} Hz is not below the Nyquist frequency "
            f"({sampling_rate / 2:g} Hz) of {sampling_rate:g} Hz data; use data sampled above "
            f"{2 * self.frequency:g} Hz or remove powerline_noise from the augmentations."
        )

    def transform(self, x, sampling_rate, generator):
        problem = self._nyquist_problem(sampling_rate)
        if problem:
            raise ConfigError(problem)
        b, n_leads, n = x.shape
        phase = _uniform(generator, (b, 1, 1), 0.0, 2 * math.pi, x)
        amp = _uniform(generator, (b, n_leads, 1), 0.0, self.amplitude, x)
        t = _time(n, sampling_rate, x)
        return x + amp * torch.sin(2 * math.pi * self.frequency * t + phase)


class AmplitudeScale(RandomAugmentation):
    """Multiply each lead (or each sample: ``per_lead = false``) by a log-uniform gain in ``[min_scale, max_scale]``."""

    def __init__(self, p: float = 0.5, min_scale: float = 0.5, max_scale: float = 2.0, per_lead: bool = True) -> None:
        super().__init__(p)
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got min_scale = {min_scale}, max_scale = {max_scale}")
        self.min_scale, self.max_scale, self.per_lead = float(min_scale), float(max_scale), per_lead

    def transform(self, x, sampling_rate, generator):
        shape = (x.shape[0], x.shape[1] if self.per_lead else 1, 1)
        log_scale = _uniform(generator, shape, math.log(self.min_scale), math.log(self.max_scale), x)
        return x * log_scale.exp()


class RandomCropResize(RandomAugmentation):
    """Crop a random window of ``U(min_fraction, max_fraction) * T`` samples and stretch it back to ``T``.

    All leads of a sample share the window; the stretch is linear interpolation.
    """

    def __init__(self, p: float = 0.5, min_fraction: float = 0.5, max_fraction: float = 1.0) -> None:
        super().__init__(p)
        _check_range("min_fraction", min_fraction, "max_fraction", max_fraction, 0.0, 1.0)
        if min_fraction <= 0:
            raise ValueError(f"min_fraction must be > 0, got {min_fraction}")
        self.min_fraction, self.max_fraction = float(min_fraction), float(max_fraction)

    def transform(self, x, sampling_rate, generator):
        b, n_leads, n = x.shape
        if n < 2:
            return x
        frac = _uniform(generator, (b, 1), self.min_fraction, self.max_fraction, x)
        span = (frac * (n - 1)).clamp(min=1.0)  # window covers [start, start + span] in sample units
        start = _uniform(generator, (b, 1), 0.0, 1.0, x) * (n - 1 - span)
        pos = start + span * torch.linspace(0.0, 1.0, n, device=x.device)  # [B, T]
        left = pos.floor().long().clamp(0, n - 1)
        right = (left + 1).clamp(max=n - 1)
        w = (pos - left.float()).unsqueeze(1)
        left = left.unsqueeze(1).expand(b, n_leads, n)
        right = right.unsqueeze(1).expand(b, n_leads, n)
        return x.gather(2, left) * (1 - w) + x.gather(2, right) * w


class JumpNoise(RandomAugmentation):
    """Add sudden baseline steps: per lead, 1 to ``max_jumps`` steps of ``U(-amplitude, amplitude)`` at random times.

    Each step persists from its onset to the end of the record (like an electrode that
    suddenly shifts).
    """

    def __init__(self, p: float = 0.5, amplitude: float = 0.5, max_jumps: int = 3) -> None:
        super().__init__(p)
        self.amplitude = _check_nonneg("amplitude", amplitude)
        if max_jumps < 1:
            raise ValueError(f"max_jumps must be >= 1, got {max_jumps}")
        self.max_jumps = max_jumps

    def transform(self, x, sampling_rate, generator):
        b, n_leads, n = x.shape
        j = self.max_jumps
        count = _on(torch.randint(1, j + 1, (b, n_leads, 1), generator=generator, device=generator.device), x)
        onset = _on(torch.randint(1, max(n, 2), (b, n_leads, j), generator=generator, device=generator.device), x)
        height = _uniform(generator, (b, n_leads, j), -self.amplitude, self.amplitude, x)
        height = height * (torch.arange(j, device=x.device) < count)  # only the first `count` jumps
        steps = torch.zeros_like(x)
        for k in range(j):  # j is small; avoids a [B, L, j, T] temporary
            t = torch.arange(n, device=x.device)
            steps += height[:, :, k : k + 1] * (t >= onset[:, :, k : k + 1])
        return x + steps


class TimeMask(RandomAugmentation):
    """Set a random span of ``U(min_fraction, max_fraction) * T`` samples to zero in every lead."""

    def __init__(self, p: float = 0.5, min_fraction: float = 0.05, max_fraction: float = 0.2) -> None:
        super().__init__(p)
        _check_range("min_fraction", min_fraction, "max_fraction", max_fraction, 0.0, 1.0)
        self.min_fraction, self.max_fraction = float(min_fraction), float(max_fraction)

    def transform(self, x, sampling_rate, generator):
        b, _, n = x.shape
        length = (_uniform(generator, (b, 1), self.min_fraction, self.max_fraction, x) * n).round().long()
        start = (_uniform(generator, (b, 1), 0.0, 1.0, x) * (n - length + 1)).floor().long()
        t = torch.arange(n, device=x.device)
        masked = (t >= start) & (t < start + length)  # [B, T]
        return x.masked_fill(masked.unsqueeze(1), 0.0)


class Compose(Augmentation):
    """Apply augmentations one after the other (each with its own probability)."""

    def __init__(self, augmentations: Sequence[Augmentation]) -> None:
        self.augmentations = list(augmentations)

    def __call__(self, x: torch.Tensor, sampling_rate: float, generator: torch.Generator) -> torch.Tensor:
        for augmentation in self.augmentations:
            x = augmentation(x, sampling_rate, generator)
        return x

    def __len__(self) -> int:
        return len(self.augmentations)

    def __repr__(self) -> str:
        return f"Compose({self.augmentations!r})"


AUGMENTATIONS: dict[str, type[RandomAugmentation]] = {
    "baseline_shift": BaselineShift,
    "baseline_wander": BaselineWander,
    "gaussian_noise": GaussianNoise,
    "powerline_noise": PowerlineNoise,
    "amplitude_scale": AmplitudeScale,
    "random_crop_resize": RandomCropResize,
    "jump_noise": JumpNoise,
    "time_mask": TimeMask,
}


def build_augmentations(
    registry, tables: Sequence[dict[str, Any]] | None, section: str, spec: SignalSpec | None = None
) -> Compose:
    """A :class:`Compose` from recipe tables ``[{name = "...", <options>}, ...]``.

    Each table is validated through the registry; errors name ``section[i]`` and the key.
    ``spec`` (when known) lets augmentations check themselves against the data, e.g. that
    the powerline frequency lies below the Nyquist frequency. With ``registry = None`` (a
    component constructed directly, outside a recipe) only the core augmentations are known.
    """
    if registry is None:
        from ssl4ecg.registry import Registry

        registry = Registry()
        register(registry)
    if tables is None:
        return Compose([])
    if isinstance(tables, dict) or not isinstance(tables, (list, tuple)):
        raise ConfigError(
            f"[{section}] must be a list of tables, e.g. [{{name = \"gaussian_noise\", p = 0.5, std = 0.05}}]; "
            f"got {type(tables).__name__}"
        )
    built = []
    for i, table in enumerate(tables):
        where = f"{section}[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"[{where}] must be a table like {{name = \"gaussian_noise\", p = 0.5}}, got {table!r}")
        if "name" not in table:
            raise ConfigError(
                f"[{where}] needs name = \"...\"; one of {', '.join(registry.names('augmentation'))}"
            )
        name = table["name"]
        known = registry.names("augmentation")
        if name not in known:
            raise ConfigError(f"[{where}] no augmentation named {name!r}.{did_you_mean(str(name), known)}")
        options = {k: v for k, v in table.items() if k != "name"}
        extra = {"spec": spec} if spec is not None else {}
        built.append(registry.build("augmentation", name, options, section=where, **extra))
    return Compose(built)


def register(registry) -> None:
    """Register the ECG augmentations as components of kind ``"augmentation"``."""
    for name, cls in AUGMENTATIONS.items():
        registry.add("augmentation", name, cls)


#: The ECG augmentation set of the SimCLR baseline in the ECG-JEPA paper (baseline shift,
#: baseline wander, Gaussian noise, 50 Hz powerline noise, channel resize, random crop,
#: jump noise), in the order applied: geometry first, then gains, then additive noises.
ECG_DEFAULT_AUGMENTATIONS: tuple[dict[str, Any], ...] = (
    {"name": "random_crop_resize", "p": 0.5, "min_fraction": 0.5, "max_fraction": 1.0},
    {"name": "amplitude_scale", "p": 0.5, "min_scale": 0.5, "max_scale": 2.0},
    {"name": "baseline_shift", "p": 0.5, "max_shift": 0.5},
    {"name": "baseline_wander", "p": 0.5, "amplitude": 0.5, "max_freq": 0.5},
    {"name": "gaussian_noise", "p": 0.5, "std": 0.05},
    {"name": "powerline_noise", "p": 0.5, "amplitude": 0.1, "frequency": 50.0},
    {"name": "jump_noise", "p": 0.5, "amplitude": 0.5, "max_jumps": 3},
)


def default_ecg_augmentations(sampling_rate: float) -> list[dict[str, Any]]:
    """:data:`ECG_DEFAULT_AUGMENTATIONS` as recipe tables for data at ``sampling_rate``.

    Powerline noise is left out when its 50 Hz is not below the Nyquist frequency
    (e.g. 100 Hz data, where mains interference cannot occur after anti-alias filtering).
    """
    return [
        dict(table)
        for table in ECG_DEFAULT_AUGMENTATIONS
        if not (table["name"] == "powerline_noise" and table["frequency"] >= sampling_rate / 2)
    ]
