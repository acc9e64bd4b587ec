"""Output folders that never clobber: new folders claimed atomically, old ones moved aside, never deleted.

* :func:`claim_new_dir` creates ``parent/stem`` (or ``stem-2``, ``stem-3``, ...) with
  ``mkdir(exist_ok=False)``, so two runs started in the same second get different folders.
* :func:`claim_out_dir` takes a folder the user named with ``--out``: a new or empty folder is
  used; a non-empty one is refused unless ``overwrite``, which *moves* it to
  ``DIR.old-<timestamp>`` first.
* :func:`check_eval_out` keeps ``ssl4ecg eval --out`` away from the run it evaluates and from
  any training run's files.
* :func:`release_unstarted` undoes a claim when the run failed before training wrote anything
  (it removes only the ``recipe.toml`` / ``env.json`` the run itself wrote, and puts a folder
  moved aside back in place).
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ssl4ecg.errors import ConfigError

#: what a run directory holds (see ssl4ecg.run)
RUN_ENTRIES = ("recipe.toml", "env.json", "log.jsonl", "metrics.json", "encoder.pt", "checkpoints")
#: entries only training writes: a folder holding recipe.toml and one of these is a training run
TRAINING_ENTRIES = ("encoder.pt", "checkpoints", "log.jsonl")
#: what a run writes before training starts (removed again when it fails before that)
SETUP_FILES = ("recipe.toml", "env.json")


@dataclass
class Claim:
    """A folder claimed for a run: whether this process created it and where an old one went."""

    path: Path
    created: bool
    moved_to: Path | None = None


def stamp() -> str:
    """The local time as used in folder names: ``YYYYmmdd-HHMMSS``."""
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _unwritable(path: Path, exc: OSError) -> ConfigError:
    reason = exc.strerror or type(exc).__name__
    return ConfigError(f"--out {path}: cannot create or write there ({reason}); choose a folder you can write to.")


def _check_writable(path: Path) -> None:
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise _unwritable(path, exc) from None


def claim_new_dir(parent: str | Path, stem: str) -> Claim:
    """Create and return a folder ``parent/stem`` that did not exist (``stem-2``, ... when it did)."""
    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(parent, exc) from None
    for i in range(1, 10_000):
        candidate = parent / (stem if i == 1 else f"{stem}-{i}")
        try:
            candidate.mkdir(exist_ok=False)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _unwritable(candidate, exc) from None
        _check_writable(candidate)
        return Claim(candidate, created=True)
    raise ConfigError(f"{parent}: 10,000 folders named {stem}-N exist already; give --out explicitly.")


def is_training_run(path: Path) -> bool:
    """True when ``path`` is a run directory that training wrote to."""
    return path.is_dir() and (path / "recipe.toml").is_file() and any((path / e).exists() for e in TRAINING_ENTRIES)


def _listing(path: Path, limit: int = 5) -> str:
    names = sorted(p.name for p in path.iterdir())
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``path.old-<timestamp>`` (``-2``, ... if taken) and return the new name."""
    base = f"{path.name}.old-{stamp()}"
    for i in range(1, 10_000):
        target = path.with_name(base if i == 1 else f"{base}-{i}")
        if target.exists() or target.is_symlink():
            continue
        try:
            os.rename(path, target)
        except FileExistsError:
            continue
        except OSError as exc:
            if target.exists():  # created in between: try the next name
                continue
            raise ConfigError(f"--overwrite: cannot move {path} aside to {target} ({exc.strerror}); "
                              "move it yourself or choose another --out.") from None
        return target
    raise ConfigError(f"--overwrite: too many folders named {base}-N beside {path}; clean them up first.")


def claim_out_dir(path: str | Path, overwrite: bool = False, command: str = "run") -> Claim:
    """Claim the folder the user gave with ``--out`` (see module docstring)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file, not a folder; give the folder to write the run into.")
    moved = None
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            if (path / "recipe.toml").is_file() and command == "run":
                hint = (f"it already holds a run ({_listing(path)}). Continue it with `ssl4ecg run --resume {path}`, "
                        f"add --overwrite to move it to {path.name}.old-<timestamp> and start afresh, "
                        "or choose another --out")
            else:
                hint = (f"it is not empty ({_listing(path)}). Choose a new or empty folder, or add --overwrite "
                        f"to move it to {path.name}.old-<timestamp> first (nothing is deleted)")
            raise ConfigError(f"--out {path}: {hint}.")
        here = Path.cwd().resolve()
        if path.resolve() == here or path.resolve() in here.parents:
            raise ConfigError(f"--out {path} --overwrite would move the folder you are working in ({here}) aside; "
                              "give a folder below it, e.g. --out runs/my_run.")
        moved = move_aside(Path(os.path.abspath(path)))  # the link itself if --out is a symlink
    created = not path.exists()
    made = False
    try:
        if created:
            path.mkdir(parents=True, exist_ok=False)  # atomic: a second process racing for it gets an error
            made = True
        _check_writable(path)
    except (OSError, ConfigError) as exc:
        if made and not any(path.iterdir()):
            path.rmdir()
        if moved is not None and not path.exists():
            os.rename(moved, path)
        if isinstance(exc, FileExistsError):
            raise ConfigError(f"--out {path} was created by another process just now; choose another --out.") from None
        raise exc if isinstance(exc, ConfigError) else _unwritable(path, exc) from None
    return Claim(path, created=created, moved_to=moved)


def check_eval_out(out: str | Path, encoder_path: str | Path) -> None:
    """Refuse an ``eval --out`` that is, holds or is part of the evaluated run or any training run."""
    out_abs = Path(out).expanduser().resolve()
    encoder_path = Path(encoder_path).expanduser().resolve()
    source = encoder_path if encoder_path.is_dir() else encoder_path.parent
    if out_abs == source or out_abs in source.parents:
        raise ConfigError(f"--out {out} is {'the run being evaluated' if out_abs == source else 'a folder holding it'} "
                          f"({source}); write the evaluation to a new folder, e.g. --out {source}-eval.")
    for place in (out_abs, *out_abs.parents):
        if not is_training_run(place):
            continue
        if place == out_abs:
            raise ConfigError(f"--out {out} is a training run directory; evaluations never write into one. "
                              "Choose a new folder.")
        child = out_abs.relative_to(place).parts[0]
        if child in RUN_ENTRIES:
            raise ConfigError(f"--out {out} is part of the run {place} ({child}); choose a folder outside it.")
        break


def release_unstarted(claim: Claim) -> bool:
    """Undo ``claim`` when the run failed before training wrote anything; True when undone.

    Removes only what a run writes while it sets up (``recipe.toml``, ``env.json`` and their
    temporary files), the folder itself if this process created it, and moves a folder that
    ``--overwrite`` had moved aside back into place. Anything else in the folder keeps it.
    """
    path = claim.path
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    ours = {n for n in names if n in SETUP_FILES or any(n.startswith(f".{f}.") and n.endswith(".tmp")
                                                           for f in SETUP_FILES)}
    if names - ours:
        return False
    for name in ours:
        try:
            (path / name).unlink()
        except OSError:
            return False
    if claim.created or claim.moved_to is not None:
        try:
            path.rmdir()
        except OSError:
            return False
    if claim.moved_to is not None and claim.moved_to.is_dir() and not path.exists():
        os.rename(claim.moved_to, path)
    return True
