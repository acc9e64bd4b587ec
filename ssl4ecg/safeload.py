"""Weights and checkpoints that are safe to share: tensors and plain values, loaded without running code.

``torch.load(..., weights_only=False)`` unpickles arbitrary objects, so a crafted ``encoder.pt``
or ``checkpoints/last.pt`` could run any program on the machine that opens it. ssl4ecg
therefore writes only tensors and plain metadata (dict, list, tuple, str, int, float, bool,
None) and reads every file with ``weights_only=True``.

* :func:`to_plain` turns what a checkpoint collects into such values: a numpy array (numpy's
  random state) becomes a tagged ``{"__ssl4ecg_ndarray__": bytes-as-uint8-tensor, dtype, shape}``
  table, a numpy scalar a Python number; anything else is refused, naming where it is.
* :func:`from_plain` undoes the array tags after loading.
* :func:`safe_load` loads a file with ``weights_only=True``. Files written before this module
  hold numpy's random state as a pickled ``ndarray``; rebuilding one needs numpy's array and
  dtype constructors only (``_reconstruct``, ``ndarray``, ``dtype`` and the numeric dtype
  classes, ``scalar``), which create arrays and numbers from raw bytes and cannot call anything
  else, so exactly these are allowed while such files load. A file that needs any other global
  is refused with :class:`UnsafeFileError`.
"""

from __future__ import annotations

import collections
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl4ecg.errors import CheckpointError

NDARRAY_TAG = "__ssl4ecg_ndarray__"
_PLAIN = (str, int, float, bool, type(None))


class UnsafeFileError(CheckpointError):
    """A weights or checkpoint file that would run code (or build arbitrary objects) when loaded."""


def _numpy_globals() -> list:
    """numpy's array constructors that files written before :func:`to_plain` existed refer to."""
    multiarray = getattr(np, "_core", None)
    multiarray = getattr(multiarray, "multiarray", None) if multiarray is not None else None
    if multiarray is None:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: list = [np.ndarray, np.dtype]
    # numpy >= 1.25 builds each dtype as its own class (numpy.dtypes.UInt32DType, ...): numeric ones only
    allowed += sorted({type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"} - {np.dtype}, key=str)
    for name in ("_reconstruct", "scalar"):
        fn = getattr(multiarray, name)
        # numpy 1.x pickles name numpy.core.multiarray, numpy 2.x numpy._core.multiarray
        allowed += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    return allowed


def to_plain(obj: Any, where: str = "") -> Any:
    """``obj`` with numpy arrays tagged and numpy scalars made Python numbers (see module docstring).

    Raises :class:`CheckpointError` naming the first value that is neither a tensor nor plain.
    """
    if isinstance(obj, (torch.Tensor, torch.dtype, torch.device)) or type(obj) in _PLAIN:
        return obj
    if isinstance(obj, np.generic):  # before the plain types: np.float64 is a float subclass
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise CheckpointError(f"cannot save {where or 'value'}: a numpy array of Python objects; "
                                  "files hold tensors and plain values only")
        data = np.ascontiguousarray(obj)
        raw = torch.from_numpy(data.reshape(-1).view(np.uint8).copy())
        return {NDARRAY_TAG: raw, "dtype": data.dtype.str, "shape": list(data.shape)}
    if isinstance(obj, dict):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for key, value in obj.items():
            if type(key) not in _PLAIN:
                raise CheckpointError(f"cannot save {where or 'value'}: key {key!r} is a {type(key).__name__}")
            out[key] = to_plain(value, f"{where}.{key}" if where else str(key))
        metadata = getattr(obj, "_metadata", None)  # a module state dict's version information
        if metadata is not None:
            out._metadata = to_plain(metadata, f"{where}._metadata")  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise CheckpointError(
        f"cannot save {where or 'value'}: it is a {type(obj).__module__}.{type(obj).__qualname__}; weights "
        "and checkpoints hold tensors, numbers, strings, lists and dicts only (so that loading them runs no "
        "code). Make the component's state_dict() return such values.")


def from_plain(obj: Any) -> Any:
    """Undo :func:`to_plain`'s array tags (recursively); everything else is returned as it is."""
    if isinstance(obj, dict):
        if NDARRAY_TAG in obj and set(obj) == {NDARRAY_TAG, "dtype", "shape"}:
            raw = obj[NDARRAY_TAG].numpy().tobytes()
            return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for key, value in obj.items():
            out[key] = from_plain(value)
        metadata = getattr(obj, "_metadata", None)
        if metadata is not None:
            out._metadata = metadata  # type: ignore[attr-defined]
        return out
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_plain(v) for v in obj)
    return obj


def _scan_pickle_globals(path: Path) -> list[str]:
    """``module.name`` of every global a bare pickle stream imports, read without unpickling it."""
    import pickletools

    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as handle:
            for opcode, arg, _ in pickletools.genops(handle):
                if opcode.name == "GLOBAL":  # "module name"
                    names.append(".".join(str(arg).split(" ", 1)))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 - a damaged stream: what was read so far
        pass
    return names


def unsafe_globals(path: Path, exc: BaseException) -> list[str]:
    """The globals (classes, functions) the file at ``path`` would need beyond weights-only loading."""
    names: list[str] = []
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: read the pickle stream itself
        names = _scan_pickle_globals(path)
    if not names:
        names = re.findall(r"GLOBAL ([\w.]+)", str(exc)) + re.findall(r"but got <class '([\w.]+)'>", str(exc))
    allowed = set()
    for entry in _numpy_globals():
        allowed.add(entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}")
    return [n for n in names if n not in allowed]


def safe_load(path: str | Path, what: str, remedy: str) -> Any:
    """Load ``path`` with ``weights_only=True`` (numpy's array constructors allowed, see module doc).

    ``what`` names the file kind in messages ("encoder file", "checkpoint") and ``remedy`` says
    what to do instead. Raises :class:`UnsafeFileError` when the file needs arbitrary
    unpickling; other failures (truncated, not a torch file) propagate to the caller.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = unsafe_globals(path, exc)
        if names:  # else a damaged file, which the caller reports as such
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise UnsafeFileError(
                f"{path} is refused: loading this {what} would run code or build arbitrary objects "
                f"(it refers to {shown}); ssl4ecg only loads files of tensors and plain values. "
                f"Do not use files from sources you do not trust; {remedy}") from None
        raise
    return from_plain(obj)
