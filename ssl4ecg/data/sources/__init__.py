"""Registered data sources. Each source reads one dataset layout into a RecordSet."""

from __future__ import annotations


def register(registry) -> None:
    """Register the core's data sources."""
    from ssl4ecg.data.synthetic import SyntheticSource

    registry.add("source", "synthetic", SyntheticSource)
