"""The component registry: every encoder, objective, masker, evaluator, source and augmentation.

Plugins fill it through the ``ssl4ecg_register`` hook; recipes build components from it.
A component's recipe keys are the keyword arguments of its factory, so the schema grows
with plugins: :meth:`Registry.build` checks keys against the signature and suggests the
closest valid key for a typo.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from ssl4ecg.errors import ConfigError, did_you_mean

KINDS = ("encoder", "objective", "masker", "evaluator", "source", "augmentation", "importer")

#: constructor arguments the builder supplies; they are never recipe keys
INJECTED = ("spec", "encoder", "masker", "registry")


@dataclass(frozen=True)
class Component:
    """One registered component: what it is, how to build it and where it came from."""

    kind: str
    name: str
    factory: Callable[..., Any]
    package: str

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.factory) or ""
        return doc.splitlines()[0] if doc else ""

    def options(self) -> dict[str, Any]:
        """Recipe keys of this component with their defaults (``inspect.Parameter.empty`` if required)."""
        params = inspect.signature(self.factory).parameters
        return {
            name: p.default
            for name, p in params.items()
            if name not in INJECTED and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }


class Registry:
    """Named components by kind. Two components of one kind may not share a name."""

    def __init__(self) -> None:
        self._items: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        self.current_package = "ssl4ecg"

    def add(self, kind: str, name: str, factory: Callable[..., Any]) -> None:
        """Register ``factory`` as component ``name`` of ``kind``."""
        if kind not in KINDS:
            raise ConfigError(f"unknown component kind '{kind}' for '{name}'.{did_you_mean(kind, KINDS)}")
        existing = self._items[kind].get(name)
        if existing is not None:
            raise ConfigError(
                f"two {kind}s are named '{name}': one from {existing.package}, one from "
                f"{self.current_package}. Uninstall one of them or rename the component."
            )
        self._items[kind][name] = Component(kind, name, factory, self.current_package)

    def names(self, kind: str) -> list[str]:
        return sorted(self._items[kind])

    def components(self, kind: str | None = None) -> list[Component]:
        kinds = KINDS if kind is None else (kind,)
        return [self._items[k][n] for k in kinds for n in sorted(self._items[k])]

    def get(self, kind: str, name: str) -> Component:
        if not isinstance(name, str):
            raise ConfigError(f"a {kind} name must be a string like \"{(self.names(kind) or ['...'])[0]}\", "
                              f"got {name!r}")
        try:
            return self._items[kind][name]
        except KeyError:
            raise ConfigError(
                f"no {kind} named '{name}' is registered.{did_you_mean(name, self._items[kind])} "
                f"Run `ssl4ecg plugins` to list them."
            ) from None

    def check(self, kind: str, name: str, options: dict[str, Any], section: str) -> Component:
        """Check recipe ``options`` of component ``name`` (keys, required keys, obvious types)."""
        component = self.get(kind, name)
        valid = component.options()
        for key, value in options.items():
            if key not in valid:
                raise ConfigError(
                    f"[{section}] unknown key '{key}' for {kind} '{name}'.{did_you_mean(key, valid)}"
                )
            check_type(section, key, value, valid[key])
        missing = [k for k, v in valid.items() if v is inspect.Parameter.empty and k not in options]
        if missing:
            raise ConfigError(f"[{section}] {kind} '{name}' needs {', '.join(repr(m) for m in missing)}.")
        return component

    def build(self, kind: str, name: str, options: dict[str, Any], section: str, **injected: Any) -> Any:
        """Build component ``name`` from recipe ``options``; ``section`` names the recipe place in errors."""
        component = self.check(kind, name, options, section)
        params = inspect.signature(component.factory).parameters
        extra = {k: v for k, v in injected.items() if k in params}
        try:
            return component.factory(**options, **extra)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[{section}] cannot build {kind} '{name}': {exc}") from exc

    def resolved_options(self, kind: str, name: str, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` completed with the component's defaults (for the saved recipe)."""
        out = {k: v for k, v in self.get(kind, name).options().items()
               if v is not inspect.Parameter.empty and v is not None}
        out.update(options)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def fits_default(value: Any, default: Any) -> bool:
    """Whether ``value`` has the type a recipe key with this ``default`` expects."""
    if default is inspect.Parameter.empty or default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return True


def check_type(section: str, key: str, value: Any, default: Any) -> None:
    """Reject values whose type clearly contradicts the default's (e.g. a string for an int)."""
    if not fits_default(value, default):
        raise ConfigError(
            f"[{section}] key '{key}' should be {type(default).__name__} like its default "
            f"{default!r}, got {value!r}."
        )


_REGISTRY: Registry | None = None


def get_registry(reload: bool = False) -> Registry:
    """The process-wide registry, filled from core and every installed plugin on first use."""
    global _REGISTRY
    if _REGISTRY is None or reload:
        _REGISTRY = collect(load_entry_points=True)
    return _REGISTRY


def collect(load_entry_points: bool = True, extra_plugins: tuple[object, ...] = ()) -> Registry:
    """A new registry from the core, the installed plugins and ``extra_plugins`` (modules/objects)."""
    from ssl4ecg.hooks import PluginLoadWarning, make_plugin_manager, plugin_package

    pm = make_plugin_manager(load_entry_points=load_entry_points)
    if load_entry_points:
        for plugin in _uninstalled_builtin_plugins():
            pm.register(plugin)
    for plugin in extra_plugins:
        pm.register(plugin)
    registry = Registry()
    for impl in pm.hook.ssl4ecg_register.get_hookimpls():
        registry.current_package = plugin_package(pm, impl.plugin)
        try:
            impl.function(registry=registry)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - a third-party plugin's bug must not stop the rest
            warnings.warn(
                f"ssl4ecg plugin '{registry.current_package}' failed while registering its "
                f"components and is skipped: {type(exc).__name__}: {exc}",
                PluginLoadWarning,
                stacklevel=2,
            )
    registry.current_package = "ssl4ecg"
    return registry


def builtin_plugin_modules() -> list[str]:
    """The built-in plugins' entry points when ssl4ecg runs from a source tree that is not installed.

    Installed, the package's entry points announce them and this is ``[]``. Without the
    package's distribution metadata (the repository on ``PYTHONPATH``) they are the values of
    ``[project.entry-points."ssl4ecg"]`` in the repository's ``pyproject.toml``.
    """
    import importlib.metadata
    from pathlib import Path

    try:
        importlib.metadata.distribution("ssl4ecg")
        return []
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        return []
    from ssl4ecg.recipe import tomllib

    table = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    return sorted(set(table.get("project", {}).get("entry-points", {}).get("ssl4ecg", {}).values()))


def _uninstalled_builtin_plugins() -> list[object]:
    """Import :func:`builtin_plugin_modules` (``module`` or ``module:attribute``); warn for each that fails."""
    import importlib

    from ssl4ecg.hooks import PluginLoadWarning

    plugins = []
    for target in builtin_plugin_modules():
        module_name, _, attribute = target.partition(":")
        try:
            plugin = importlib.import_module(module_name)
            plugins.append(getattr(plugin, attribute) if attribute else plugin)
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not stop the rest
            warnings.warn(
                f"built-in plugin '{target}' failed to load and is skipped: {type(exc).__name__}: {exc}. "
                "ssl4ecg is not installed: put the repository's plugins/ folder on PYTHONPATH "
                "or run `pip install -e .`",
                PluginLoadWarning,
                stacklevel=3,
            )
    return plugins
