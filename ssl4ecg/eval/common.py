"""Plumbing shared by the evaluators: task preparation, option checks, seeding, protocol dicts."""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ssl4ecg.errors import ConfigError

SPLITS = ("train", "val", "test")


@dataclass
class Task:
    """A labelled classification task drawn from a RecordSet.

    ``index[split]`` are record positions in the RecordSet, ``targets[split]`` the matching
    ``[n, C]`` float targets (multi-hot, or one-hot for multi-class tasks). Multi-class tasks keep
    only records with exactly one positive label; ``dropped[split]`` counts the others.
    """

    class_names: tuple[str, ...]
    multi_label: bool
    index: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    dropped: dict[str, int] = field(default_factory=dict)
    record_ids: dict[str, np.ndarray] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Number of records per split."""
        return {s: int(len(i)) for s, i in self.index.items()}

    def split_hash(self) -> str:
        """A short hash of the record ids of every split: equal hashes = the same evaluation data."""
        return hash_splits(self.record_ids)

    def class_index(self, split: str) -> np.ndarray:
        """Class index ``[n]`` of each record (multi-class tasks)."""
        return np.argmax(self.targets[split], axis=1)

    def protocol(self) -> dict[str, Any]:
        """The task part of a protocol description."""
        return {
            "task": "multi_label" if self.multi_label else "multi_class",
            "classes": list(self.class_names),
            "split_sizes": self.sizes(),
            "split_hash": self.split_hash(),
        }


def prepare_task(
    records, multi_label: bool, evaluator: str, splits: Sequence[str] = SPLITS
) -> Task:
    """Check that ``records`` can be scored and build the :class:`Task` on ``splits``.

    Raises :class:`ConfigError` when the data is unlabelled or a split is empty.
    """
    if not getattr(records, "is_labelled", False):
        raise ConfigError(
            f"evaluator '{evaluator}' needs labelled data (labels and class_names); the [data] "
            f"source gives none. Use a labelled source or drop this [[eval]] entry."
        )
    labels = np.asarray(records.labels, dtype=np.float32)
    index: dict[str, np.ndarray] = {}
    targets: dict[str, np.ndarray] = {}
    dropped: dict[str, int] = {}
    ids: dict[str, np.ndarray] = {}
    for split in splits:
        idx = np.flatnonzero(np.asarray(records.splits) == split)
        y = labels[idx] > 0.5
        if not multi_label:
            single = y.sum(axis=1) == 1
            dropped[split] = int((~single).sum())
            idx, y = idx[single], y[single]
        if len(idx) == 0:
            what = " single-label" if not multi_label else ""
            raise ConfigError(
                f"evaluator '{evaluator}' needs{what} records in the '{split}' split, found none. "
                f"Assign train/val/test splits in [data] (e.g. the PTB-XL folds 1-8/9/10)."
            )
        index[split] = idx
        targets[split] = y.astype(np.float32)
        ids[split] = np.asarray(records.record_ids)[idx]
    return Task(tuple(records.class_names), multi_label, index, targets, dropped, ids)


def hash_splits(record_ids: dict[str, np.ndarray]) -> str:
    """A short hash of the record ids of each split (order-free): equal hashes = same data."""
    h = hashlib.sha1()
    for s in sorted(record_ids):
        h.update(s.encode() + b"\0")
        h.update("\n".join(sorted(np.asarray(record_ids[s]).astype(str).tolist())).encode() + b"\0")
    return h.hexdigest()[:12]


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Seed torch's global generators for the block and restore the caller's state afterwards."""
    devices = []
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        devices = [torch.device(device).index or 0]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def derive_seed(seed: int, *parts: Any) -> int:
    """A stable 31-bit seed from ``seed`` and any labels (e.g. a trial number, a fraction)."""
    h = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


class BestOnValidation:
    """Remembers a module's weights at the epoch with the best (finite) validation score.

    ``offload=True`` keeps the copy on the CPU (a fine-tuned encoder on a GPU), and
    :attr:`since_best` counts the epochs since the last improvement (for early stopping).
    """

    def __init__(self, offload: bool = False) -> None:
        self.score = -math.inf
        self.epoch = 0
        self.state: dict | None = None
        self.offload = offload
        self.since_best = 0

    def update(self, score: float, epoch: int, module) -> bool:
        """Keep a copy of ``module``'s weights if ``score`` beats the best so far."""
        if not (np.isfinite(score) and score > self.score):
            self.since_best += 1
            return False
        self.score, self.epoch, self.since_best = float(score), int(epoch), 0
        if self.offload:
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        else:
            self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return True

    def best_state(self) -> dict:
        """The kept weights; a ConfigError when no epoch had a usable validation score."""
        if self.state is None:
            raise ConfigError(
                "the val split has no class with both positive and negative records, so nothing can be "
                "chosen on it; use a larger or stratified val split."
            )
        return self.state


# ---- option checks: one ConfigError naming the key ------------------------------------------

def check_positive_int(evaluator: str, key: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"evaluator '{evaluator}': key '{key}' must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_float(evaluator: str, key: str, value: Any, low: float = 0.0, high: float = math.inf,
                low_open: bool = False) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(
            f"evaluator '{evaluator}': key '{key}' must be a number in {bracket}{low}, {high}], got {value!r}."
        )
    return float(value)


def check_float_list(evaluator: str, key: str, values: Any, low: float = 0.0, high: float = math.inf,
                     low_open: bool = False, allow_empty: bool = True) -> tuple[float, ...]:
    """``values`` as a tuple of floats, each checked like :func:`check_float`."""
    if not isinstance(values, (list, tuple)) or (not allow_empty and not values):
        raise ConfigError(f"evaluator '{evaluator}': key '{key}' must be a {'non-empty ' if not allow_empty else ''}list of numbers, got {values!r}.")
    return tuple(check_float(evaluator, key, v, low, high, low_open) for v in values)


def check_choice(evaluator: str, key: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ConfigError(
            f"evaluator '{evaluator}': key '{key}' must be one of {list(choices)}, got {value!r}."
        )
    return value


def check_split(evaluator: str, key: str, value: Any) -> str:
    """A split name (train/val/test)."""
    return check_choice(evaluator, key, value, SPLITS)


def finite_or_none(x: float) -> float | None:
    """``x`` as float, or ``None`` when it is NaN/inf (JSON has no NaN)."""
    return float(x) if x is not None and math.isfinite(float(x)) else None
