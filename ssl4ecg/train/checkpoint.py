"""Training checkpoints: atomic writes, the previous good one kept, RNG states captured.

``checkpoints/last.pt`` is the newest checkpoint and ``checkpoints/previous.pt`` the one
before it. Loading falls back to ``previous.pt`` (with a warning) when ``last.pt`` is
missing, truncated or corrupt.
"""

from __future__ import annotations

import io
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl4ecg.errors import CheckpointError
from ssl4ecg.io import atomic_write

LAST = "last.pt"
PREVIOUS = "previous.pt"


def rng_state() -> dict[str, Any]:
    """The global random states of Python, numpy and torch (CPU and CUDA)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` as ``last.pt`` atomically, keeping the former ``last.pt`` as ``previous.pt``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    last = directory / LAST
    tmp_name = directory / ".next.pt"
    atomic_write(tmp_name, lambda f: f.write(payload))
    if last.exists():
        last.replace(directory / PREVIOUS)
    tmp_name.replace(last)
    return last


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The newest readable checkpoint in ``directory`` (``last.pt``, else ``previous.pt``)."""
    directory = Path(directory)
    candidates = [directory / LAST, directory / ".next.pt", directory / PREVIOUS]
    problems = []
    for path in candidates:
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or "step" not in state:
                raise CheckpointError("not an ssl4ecg training checkpoint")
        except Exception as exc:  # noqa: BLE001 - truncated zip, unpickling error, ...
            problems.append(f"{path.name}: {type(exc).__name__}: {exc}")
            continue
        if problems:
            warnings.warn(
                f"checkpoint {problems[0]} is unreadable; resuming from {path} instead", stacklevel=2
            )
        return state
    if problems:
        raise CheckpointError(
            f"no readable checkpoint in {directory}: " + "; ".join(problems)
            + ". Start the run again without --resume."
        )
    raise CheckpointError(f"no checkpoint in {directory}; nothing to resume. Start the run without --resume.")
