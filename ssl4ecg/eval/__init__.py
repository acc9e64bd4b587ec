"""Evaluators, metrics with bootstrap intervals, comparison tables and plots."""

from __future__ import annotations


def register(registry) -> None:
    """Register the core's evaluators."""
    from ssl4ecg.eval.linear_probe import LinearProbe

    registry.add("evaluator", "linear_probe", LinearProbe)
