"""Training checkpoints: atomic writes, the previous good one kept, RNG states captured.

``checkpoints/last.pt`` is the newest checkpoint and ``checkpoints/previous.pt`` the one
before it. Loading falls back to ``previous.pt`` (with a warning) when ``last.pt`` is
missing, truncated or corrupt. Checkpoints hold tensors and plain values only (numpy's
random state is stored as a tagged byte tensor, see :mod:`ssl4ecg.safeload`) and are read
with ``weights_only=True``; a file that would need arbitrary unpickling is refused outright.
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
from ssl4ecg.safeload import UnsafeFileError, safe_load, to_plain

_NEW_RANK_SALT = 0x4A4E4B  # seeds the generators of ranks a checkpoint did not have
LAST = "last.pt"
PREVIOUS = "previous.pt"


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's global random states: Python, numpy, torch's CPU and, on CUDA, its own GPU's."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`rng_state` captured (the GPU state onto this process's ``device``)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda_device" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)


def capture_rank_state(generator: torch.Generator, device_generator: torch.Generator,
                       device: torch.device | None = None) -> dict[str, Any]:
    """One rank's random states: the loop's generators and the process's global states."""
    state = {"generator": generator.get_state(), "rng": rng_state(device)}
    if device_generator is not generator:
        state["device_generator"] = device_generator.get_state()
    return state


def rank_states_of(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """Every saved rank's random states, in rank order (checkpoints before per-rank states: rank 0's)."""
    if "ranks" in checkpoint:
        return list(checkpoint["ranks"])
    return [{"generator": checkpoint["generator"], "rng": checkpoint["rng"]}]


def restore_rank_state(states: list[dict[str, Any]], rank: int, generator: torch.Generator,
                       device_generator: torch.Generator, device: torch.device | None = None,
                       fallback_seed: tuple[int, int] = (0, 0)) -> bool:
    """Give this ``rank`` its own saved random states; True when the checkpoint had them.

    A rank the checkpoint did not have (resuming on more processes than saved it) gets
    generators seeded from ``(seed, step, rank)`` instead: reproducible and distinct from every
    other rank. Resuming on fewer processes drops the states of the missing ranks.
    """
    if rank < len(states):
        state = states[rank]
        generator.set_state(state["generator"])
        if device_generator is not generator and "device_generator" in state:
            device_generator.set_state(state["device_generator"])
        set_rng_state(state["rng"], device)
        return True
    seed, step = fallback_seed
    words = np.random.SeedSequence([int(seed), int(step), int(rank), _NEW_RANK_SALT]).generate_state(2, np.uint64)
    generator.manual_seed(int(words[0]) >> 1)
    if device_generator is not generator:
        device_generator.manual_seed(int(words[1]) >> 1)
    return False


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` as ``last.pt`` atomically, keeping the former ``last.pt`` as ``previous.pt``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(to_plain(state), buffer)  # tensors and plain values only: loads with weights_only=True
    payload = buffer.getvalue()
    last = directory / LAST
    tmp_name = directory / ".next.pt"
    atomic_write(tmp_name, lambda f: f.write(payload))
    if last.exists():
        last.replace(directory / PREVIOUS)
    tmp_name.replace(last)
    return last


def checkpoint_step(directory: str | Path) -> tuple[str, int] | None:
    """(file name, step) of the newest readable checkpoint in ``directory``, or None when there is none."""
    directory = Path(directory)
    if not any((directory / name).exists() for name in (LAST, ".next.pt", PREVIOUS)):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state, path = _load_newest(directory)
    except CheckpointError:
        return None
    return path.name, int(state["step"])


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The newest readable checkpoint in ``directory`` (``last.pt``, else ``previous.pt``)."""
    return _load_newest(Path(directory))[0]


def _load_newest(directory: Path) -> tuple[dict[str, Any], Path]:
    candidates = [directory / LAST, directory / ".next.pt", directory / PREVIOUS]
    problems = []
    for path in candidates:
        if not path.exists():
            continue
        try:
            state = safe_load(path, "checkpoint", f"start the run again without --resume (or restore "
                                                  f"{directory} from a copy you made yourself).")
            if not isinstance(state, dict) or "step" not in state:
                raise CheckpointError("not an ssl4ecg training checkpoint")
        except UnsafeFileError:
            raise  # never fall back past a file that tried to run code: someone changed this run
        except Exception as exc:  # noqa: BLE001 - truncated zip, unpickling error, ...
            problems.append(f"{path.name}: {type(exc).__name__}: {exc}")
            continue
        if problems:
            warnings.warn(
                f"checkpoint {problems[0]} is unreadable; resuming from {path} instead", stacklevel=3
            )
        return state, path
    if problems:
        raise CheckpointError(
            f"no readable checkpoint in {directory}: " + "; ".join(problems)
            + ". Start the run again without --resume."
        )
    raise CheckpointError(f"no checkpoint in {directory}; nothing to resume. Start the run without --resume.")
