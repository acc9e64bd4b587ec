"""Pluggy hook specifications and plugin discovery.

A plugin is any importable module with a function marked ``@hookimpl`` named
``ssl4ecg_register(registry)``. Installed packages announce their plugin module under the
entry-point group ``"ssl4ecg"``; the built-in methods in ``plugins/`` are found the same
way (see ``[project.entry-points."ssl4ecg"]`` in ``pyproject.toml``)::

    from ssl4ecg import hookimpl

    @hookimpl
    def ssl4ecg_register(registry):
        registry.add("objective", "my_objective", MyObjective)
"""

from __future__ import annotations

import importlib.metadata
import warnings

import pluggy

PROJECT = "ssl4ecg"
ENTRY_POINT_GROUP = "ssl4ecg"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Ssl4ecgSpecs:
    """The hooks a plugin may implement."""

    @hookspec
    def ssl4ecg_register(self, registry):  # pragma: no cover - specification only
        """Register components with ``registry.add(kind, name, factory)``.

        ``kind`` is one of ``encoder``, ``objective``, ``masker``, ``evaluator``,
        ``source``, ``augmentation``, ``importer`` (converts a published checkpoint into
        an encoder for ``ssl4ecg import NAME``); ``factory`` is a class or function whose keyword
        arguments are the recipe keys of that component.
        """


class PluginLoadWarning(UserWarning):
    """A plugin could not be imported or registered; the rest of the framework still works."""


def make_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager holding the core components and every installed plugin.

    Each entry point is loaded on its own, so one broken plugin produces a
    :class:`PluginLoadWarning` naming it instead of stopping the program.
    """
    from ssl4ecg import components as core_components

    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(Ssl4ecgSpecs)
    pm.register(core_components, name="ssl4ecg")
    if load_entry_points:
        names = sorted({ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})
        for name in names:
            try:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
            except Exception as exc:  # noqa: BLE001 - any import error of a third-party plugin
                warnings.warn(
                    f"ssl4ecg plugin '{name}' failed to load and is skipped: "
                    f"{type(exc).__name__}: {exc}",
                    PluginLoadWarning,
                    stacklevel=2,
                )
    return pm


def plugin_package(pm: pluggy.PluginManager, plugin: object) -> str:
    """The distribution (package name) a registered plugin came from."""
    for plug, dist in pm.list_plugin_distinfo():
        if plug is plugin:
            return f"{dist.metadata['name']} {dist.version}"
    if pm.get_name(plugin) == "ssl4ecg":  # the core's own registrations
        from ssl4ecg import __version__

        return f"ssl4ecg {__version__}"
    return pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))
