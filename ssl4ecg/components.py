"""The core's own plugin: registers the components that ship inside ``ssl4ecg`` itself.

Each area of the core (data sources, augmentations, encoders, evaluators) exposes a
``register(registry)`` function; this module is the one place that calls them.
"""

from __future__ import annotations

from ssl4ecg.hooks import hookimpl


@hookimpl
def ssl4ecg_register(registry) -> None:
    """Register the core's sources, augmentations, shared encoders and evaluators."""
    from ssl4ecg.augment import register as register_augmentations
    from ssl4ecg.data.sources import register as register_sources
    from ssl4ecg.eval import register as register_evaluators
    from ssl4ecg.nn.resnet1d import register as register_resnet1d

    register_sources(registry)
    register_augmentations(registry)
    register_resnet1d(registry)
    register_evaluators(registry)
