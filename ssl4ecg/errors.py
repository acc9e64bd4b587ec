"""User-facing errors: one clear message naming the file or key and what to do."""

from __future__ import annotations

import difflib
from typing import Iterable


class Ssl4ecgError(Exception):
    """Base class of errors that the CLI prints as one line, without a stack trace."""


class ConfigError(Ssl4ecgError):
    """A recipe, option or component name is wrong."""


class DataError(Ssl4ecgError):
    """A dataset path, file or record cannot be used."""


class CheckpointError(Ssl4ecgError):
    """A checkpoint is missing, truncated or does not match the model."""


class TrainingError(Ssl4ecgError):
    """Training cannot continue (e.g. the loss became NaN)."""


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The valid choice closest to a misspelt ``word``, or ``None`` if nothing is close."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` when a close choice exists, else a list of valid choices."""
    choices = sorted(set(choices))
    best = closest(word, choices)
    if best is not None:
        return f" Did you mean '{best}'?"
    return f" Valid choices: {', '.join(choices) if choices else '(none)'}."
