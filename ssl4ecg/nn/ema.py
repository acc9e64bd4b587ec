"""Exponential-moving-average (EMA) teachers: the in-place update and its momentum schedule."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * source`` for every parameter, in place.

    Parameters are matched by name and must have equal shapes; buffers (e.g. running
    statistics) are copied from ``source`` as they are. ``momentum`` 1 leaves the target
    unchanged, 0 copies the source. No autograd graph is recorded.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    source_params = dict(source.named_parameters())
    target_params = dict(target.named_parameters())
    if source_params.keys() != target_params.keys():
        missing = sorted(source_params.keys() - target_params.keys())
        extra = sorted(target_params.keys() - source_params.keys())
        raise ValueError(f"EMA target and source differ: missing {missing}, unexpected {extra}")
    targets, sources = [], []
    for name, t in target_params.items():
        s = source_params[name]
        if t.shape != s.shape:
            raise ValueError(f"EMA parameter '{name}' has shape {tuple(t.shape)} vs {tuple(s.shape)}")
        targets.append(t)
        sources.append(s.detach().to(dtype=t.dtype))
    if targets and momentum != 1.0:
        # t + (s - t) * (1 - m)  ==  m * t + (1 - m) * s
        torch._foreach_lerp_(targets, sources, 1.0 - momentum)
    source_buffers = dict(source.named_buffers())
    for name, buffer in target.named_buffers():
        if name in source_buffers:
            buffer.copy_(source_buffers[name])


def linear_momentum(start: float, end: float, progress: float) -> float:
    """Momentum rising linearly from ``start`` (progress 0) to ``end`` (progress 1, clamped)."""
    progress = min(1.0, max(0.0, float(progress)))
    return start + (end - start) * progress
