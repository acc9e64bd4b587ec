"""Registered data sources. Each source reads one dataset layout into a RecordSet.

Real datasets are :class:`~ssl4ecg.data.sources.base.RecordSource` subclasses (listed
cheaply, read record by record, preparable into caches in parallel); see
``docs/data/sources.md`` for every source and option.
"""

from __future__ import annotations

#: registry name -> "module:class" of the real-data sources shipped with the core
REAL_SOURCES = {
    "ptbxl": "ssl4ecg.data.sources.ptbxl:PTBXLSource",
    "cinc": "ssl4ecg.data.sources.cinc:CinCSource",
    "cpsc2018": "ssl4ecg.data.sources.cpsc2018:CPSC2018Source",
    "code15": "ssl4ecg.data.sources.code15:Code15Source",
    "folder": "ssl4ecg.data.sources.folder:FolderSource",
}


def register_real_sources(registry) -> None:
    """Register the real-dataset sources (ptbxl, cinc, cpsc2018, code15, folder)."""
    import importlib

    for name, target in REAL_SOURCES.items():
        module, cls = target.split(":")
        registry.add("source", name, getattr(importlib.import_module(module), cls))


def register(registry) -> None:
    """Register the core's data sources."""
    register_real_sources(registry)
    from ssl4ecg.data.sources.deepfake import DeepfakeSource
    from ssl4ecg.data.synthetic import SyntheticSource

    registry.add("source", "synthetic", SyntheticSource)
    registry.add("source", "deepfake", DeepfakeSource)
