"""Impossible sizes refused before anything is built: model parameters and signal memory.

A recipe such as ``encoder.dim = 100000000`` or ``data.seconds = 1e9`` is syntactically fine
and would end, minutes later, in an allocation failure. :func:`check_model_size` builds the
components on PyTorch's ``meta`` device (shapes only, no memory) and counts their parameters;
:func:`check_data_size` multiplies out the signal array. Both refuse with an estimate of what
the run would need. The estimates are lower bounds (activations, copies and temporaries are
not counted), so a run they refuse cannot fit.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ssl4ecg.errors import ConfigError

#: no recipe may build more parameters than this, whatever the machine
MAX_PARAMETERS = 10**10
#: nor more modules, parameters and buffers together (a ViT-Huge has about 900, one of depth 1000
#: about 27,000); building stops there, so even layer loops that cost O(n^2) (nn.GRU) stop within seconds
MAX_PARTS = 50_000
#: bytes per trained parameter: fp32 weight, gradient and AdamW's two moments
TRAIN_BYTES_PER_PARAMETER = 16
#: bytes per stored signal sample (float32)
SAMPLE_BYTES = 4


def human_bytes(n: float) -> str:
    """``n`` bytes as B/KB/MB/GB/TB/PB (powers of 1000)."""
    if not math.isfinite(n):
        return "more than can be counted"
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return f"{n:.1f} PB"  # pragma: no cover


def available_memory() -> int | None:
    """Bytes of RAM available to a new allocation (MemAvailable on Linux), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def device_memory(device: torch.device) -> int | None:
    """Bytes the model's device can hold: a GPU's total memory, else the available RAM."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device.index or 0).total_memory)
    if device.type == "cpu":
        return available_memory()
    return None


class _TooLarge(BaseException):
    """Raised from inside a meta build that passed a limit (a BaseException: no `except Exception` stops it)."""


@contextlib.contextmanager
def _abort_when_too_large():
    """While building: stop once more than MAX_PARTS modules, parameters and buffers were registered.

    ``depth = 10**18`` would otherwise loop (and allocate module objects) for ever, meta device or
    not. Parameter *sizes* need no such stop: on the meta device they cost nothing and are counted after.
    """
    from torch.nn.modules import module as nn_module

    count = [0]

    def on_part(*_):
        count[0] += 1
        if count[0] > MAX_PARTS:
            raise _TooLarge(f"more than {MAX_PARTS:,} modules, parameters and buffers")

    handles = [nn_module.register_module_module_registration_hook(on_part),
               nn_module.register_module_parameter_registration_hook(on_part),
               nn_module.register_module_buffer_registration_hook(on_part)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def meta_counts(build: Callable[[], Any], what: str = "the model") -> tuple[int, int, int] | None:
    """(trainable parameters, frozen parameters, buffer elements) of ``build()``'s result, built on the meta device.

    ``None`` when a component cannot be built there (it reads real values while it is built);
    such components are then only checked by their real build. A :class:`ConfigError` the build
    raises (a wrong option) is raised as it is. Python's, numpy's and torch's
    global random states are left as they were. Raises :class:`ConfigError` as soon as the
    build passes :data:`MAX_PARTS` modules, parameters and buffers.
    """
    try:
        with _global_rng_kept(), _abort_when_too_large(), torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real build warns, once
            built = build()
    except _TooLarge as exc:
        raise ConfigError(f"{what} would have {exc} (stopped building it); lower its width (dim) or depth.") from None
    except ConfigError:
        raise  # the recipe's own error (the registry reports a component's TypeError/ValueError so)
    except Exception:  # noqa: BLE001 - meta-only failures: the real build reports real errors
        return None
    modules = [m for m in (built if isinstance(built, (tuple, list)) else (built,)) if isinstance(m, torch.nn.Module)]
    trainable: dict[int, int] = {}
    frozen: dict[int, int] = {}
    buffers: dict[int, int] = {}
    for module in modules:
        for p in module.parameters():
            (trainable if p.requires_grad else frozen)[id(p)] = p.numel()
        buffers.update({id(b): b.numel() for b in module.buffers()})
    return sum(trainable.values()), sum(frozen.values()), sum(buffers.values())


def check_model_size(build: Callable[[], Any], what: str, device: torch.device | None = None,
                     training: bool = True) -> int | None:
    """Refuse ``what`` (e.g. "[encoder] cropa_vit dim=..., depth=...") when it cannot fit; returns its parameters.

    Above :data:`MAX_PARAMETERS` parameters, or when the parameters' training state
    (:data:`TRAIN_BYTES_PER_PARAMETER` bytes per trainable parameter, 4 per frozen one such as an
    EMA teacher's, 4 each when only evaluated) exceeds the memory of ``device``, raises
    :class:`ConfigError` with the estimate.
    """
    counts = meta_counts(build, what)
    if counts is None:
        return None
    trainable, frozen, buffer_elements = counts
    params = trainable + frozen
    need = trainable * (TRAIN_BYTES_PER_PARAMETER if training else 4) + (frozen + buffer_elements) * 4
    purpose = "to train (weights, gradients, AdamW moments)" if training else "for its weights"
    if params > MAX_PARAMETERS:
        raise ConfigError(f"{what} would have {params:.3g} parameters (more than the limit of {MAX_PARAMETERS:.0e}), "
                          f"needing about {human_bytes(need)} {purpose}; lower its width (dim) or depth.")
    have = device_memory(device) if device is not None else None
    if have is not None and need > have:
        raise ConfigError(f"{what} would have {params:.3g} parameters, needing about {human_bytes(need)} {purpose}; "
                          f"{device} has {human_bytes(have)}. Lower its width (dim) or depth.")
    return params


def signal_bytes(section: Mapping[str, Any]) -> tuple[int, int | None]:
    """(bytes of one preprocessed record, records when the section says how many, else None)."""
    leads = len(section.get("leads") or ()) or 12
    samples = float(section["seconds"]) * float(section["sampling_rate"])
    n_records = section.get("n_records")
    known = int(n_records) if isinstance(n_records, int) and not isinstance(n_records, bool) and n_records > 0 \
        else None
    size = leads * samples * SAMPLE_BYTES
    return (int(size) if math.isfinite(size) else size), known


def _existing_parent(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_data_size(section: Mapping[str, Any], where: str = "[data]") -> None:
    """Refuse a resolved data section whose signals cannot be held (RAM) or prepared (``cache_dir`` disk).

    Prepared caches (``cache``, ``mixture``) are memory-mapped and already exist: not checked.
    """
    if section.get("cache") or section.get("mixture"):
        return
    per_record, known = signal_bytes(section)
    records = known or 1
    need = float(per_record) * records
    if section.get("cache_dir"):
        try:
            have: int | None = shutil.disk_usage(_existing_parent(Path(str(section["cache_dir"])))).free
        except OSError:
            have = None
        place = f"free disk space under cache_dir {section['cache_dir']}"
    else:
        have = available_memory()
        place = "memory available"
    if not math.isfinite(need) or (have is not None and need > have):
        have = have or 0
        amount = (f"about {human_bytes(need)} for {records} records of {human_bytes(per_record)}" if known
                  else f"{human_bytes(per_record)} for a single record")
        raise ConfigError(
            f"{where} seconds = {section['seconds']:g} at sampling_rate = {section['sampling_rate']:g} Hz with "
            f"{len(section.get('leads') or ()) or 12} leads needs {amount} (float32 signals); there is "
            f"{human_bytes(have)} of {place}. Lower seconds, sampling_rate or the number of records.")


@contextlib.contextmanager
def _global_rng_kept():
    """Leave Python's, numpy's and torch's (CPU) global random states as they were."""
    import random

    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _describe(section: Mapping[str, Any], label: str) -> str:
    numbers = ", ".join(f"{k} = {v if isinstance(v, int) else format(v, 'g')}" for k, v in section.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool))
    return f"[{label}] {section.get('name')}" + (f" ({numbers})" if numbers else "")


def check_run_resources(run) -> None:
    """Refuse a resolved :class:`ssl4ecg.run.Run` whose data or model cannot fit (see module docstring).

    Builds the components on the meta device with the data's signal shape (the global random
    states are kept, so the run itself is unchanged).
    """
    from ssl4ecg.interfaces import SignalSpec

    recipe = run.recipe
    check_data_size(recipe.data, "[data]")
    if recipe.eval_data:
        check_data_size(recipe.eval_data, "[eval_data]")
    if not recipe.encoder or not recipe.objective:
        return
    data = recipe.data
    spec = SignalSpec(tuple(data["leads"]), float(data["sampling_rate"]),
                      int(round(float(data["seconds"]) * float(data["sampling_rate"]))))
    training = int(recipe.train.get("max_steps", -1)) != 0
    options = {k: v for k, v in recipe.encoder.items() if k != "name"}
    encoder = _describe(recipe.encoder, "encoder")
    check_model_size(lambda: run.registry.build("encoder", recipe.encoder["name"], options, "encoder", spec=spec),
                     encoder, run.device, training)
    check_model_size(lambda: run.build(spec), f"{encoder} with {_describe(recipe.objective, 'objective')}",
                     run.device, training)
