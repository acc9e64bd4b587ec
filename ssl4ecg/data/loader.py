"""Deterministic, resumable, shardable batch loaders over RecordSets.

:class:`BatchLoader` walks one RecordSet, :class:`MixtureLoader` several with sampling
weights. Both are pure functions of ``(seed, epoch, position)``:

* the order of an epoch is drawn from a generator seeded by ``(seed, epoch)`` only;
* with ``world_size > 1`` every rank takes a disjoint, equal-size share of that order
  (``order[rank::world_size]``, after dropping the tail -- ``drop_last`` -- or padding it
  with the first records of the order so that it divides evenly, like
  ``torch.utils.data.DistributedSampler``);
* random crops are drawn from a generator seeded by ``(seed, epoch, batch position, rank)``;
* ``state_dict()`` holds the epoch and the number of batches already handed out in it, so a
  restarted run continues bit-exactly mid-epoch after ``load_state_dict``.

Batches are built by indexing numpy arrays (memory maps of caches included); an optional
background thread (``prefetch``) builds the next batches while the caller trains.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Sequence

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from ssl4ecg.data.records import RecordSet
from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import Batch, SignalSpec

CROP_MODES = ("random", "start", "center")
_ORDER_SALT = 0x5EED0
_CROP_SALT = 0xC409
_MIX_SALT = 0x313E


def _shard(order: np.ndarray, rank: int, world_size: int, drop_last: bool) -> np.ndarray:
    """This rank's share of an epoch order (DistributedSampler semantics)."""
    if world_size == 1:
        return order
    n = len(order)
    if drop_last:
        order = order[: (n // world_size) * world_size]
    else:
        total = -(-n // world_size) * world_size
        order = np.resize(order, total)  # repeats the start of the order to fill the tail
    return order[rank::world_size]


class _Loader:
    """Shared machinery: epoch/position state, batch assembly, prefetching."""

    def __init__(self, parts: Sequence[RecordSet], indices: Sequence[np.ndarray], batch_size: int, *,
                 drop_last: bool, seed: int, rank: int, world_size: int, crop_samples: int | None,
                 crop: str, prefetch: int) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size}).")
        if crop not in CROP_MODES:
            raise ConfigError(f"loader crop '{crop}' is not one of {', '.join(CROP_MODES)}.")
        first = parts[0]
        for rs in parts:
            if not isinstance(rs.signals, np.ndarray) or rs.signals.ndim != 3:
                raise ConfigError("the loader needs preprocessed records [N, leads, T]; "
                                  "load them with ssl4ecg.data.build.load_records")
            if (tuple(rs.leads), float(rs.sampling_rate), rs.signals.shape[1:]) != (
                    tuple(first.leads), float(first.sampling_rate), first.signals.shape[1:]):
                raise ConfigError(
                    f"mixture parts differ in leads, rate or length: {list(first.leads)} at "
                    f"{first.sampling_rate} Hz x {first.signals.shape[-1]} vs {list(rs.leads)} at "
                    f"{rs.sampling_rate} Hz x {rs.signals.shape[-1]}; prepare them with the same [data] settings")
        length = first.signals.shape[-1]
        if crop_samples is not None and not (0 < int(crop_samples) <= length):
            raise ConfigError(f"crop_samples {crop_samples} must be in [1, {length}] (the record length).")
        self.parts = list(parts)
        self.indices = [np.asarray(ix, dtype=np.int64) for ix in indices]
        self.batch_size = batch_size
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.crop_samples = None if crop_samples is None or int(crop_samples) == length else int(crop_samples)
        self.crop = crop
        self.prefetch = max(0, int(prefetch))
        self.epoch = 0
        self.position = 0
        names = [tuple(rs.class_names) for rs in parts]
        self._labelled = (all(rs.labels is not None for rs in parts) and len(set(names)) == 1
                          and len({rs.labels.shape[1:] for rs in parts}) == 1)
        self._extra_keys = sorted(set.intersection(*[
            {k for k, v in rs.extra.items() if np.issubdtype(np.asarray(v).dtype, np.number)}
            for rs in parts]))
        if len(self) == 0:
            raise ConfigError(
                f"{self.n_records} records with batch_size {batch_size} on {world_size} rank(s) give no "
                f"full batch (drop_last); lower batch_size or use more data.")

    # -- sizes and state ---------------------------------------------------------------
    @property
    def n_records(self) -> int:
        """Records one epoch draws from (all ranks together)."""
        return int(sum(len(ix) for ix in self.indices))

    def _epoch_size(self) -> int:
        return self.n_records

    def _per_rank(self) -> int:
        n = self._epoch_size()
        return n // self.world_size if self.drop_last else -(-n // self.world_size)

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        per = self._per_rank()
        return per // self.batch_size if self.drop_last else -(-per // self.batch_size)

    @property
    def spec(self) -> SignalSpec:
        """Geometry of the batches (leads, rate, samples after cropping)."""
        rs = self.parts[0]
        return SignalSpec(tuple(rs.leads), float(rs.sampling_rate),
                          self.crop_samples or int(rs.signals.shape[-1]))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a new epoch starts at its first batch."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.position = 0

    def state_dict(self) -> dict:
        """Where iteration stands (epoch, batches handed out) plus what must match on resume."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size,
                "n_records": self.n_records, "drop_last": self.drop_last,
                "kind": type(self).__name__}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``; a change of data, batch size, seed or world size is refused."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "world_size", "n_records", "drop_last", "kind"):
            if key in state and state[key] != mine[key]:
                raise ConfigError(
                    f"cannot resume the data loader: its {key} was {state[key]!r} in the checkpoint "
                    f"and is {mine[key]!r} now; resume with the same data and settings.")
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise ConfigError(f"loader state position {position} is outside [0, {len(self)}].")
        self.epoch = int(state["epoch"])
        self.position = position

    # -- the epoch plan -----------------------------------------------------------------
    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        """(part, row) of every sample of this rank's epoch, in order."""
        raise NotImplementedError

    def _crop_starts(self, epoch: int, b: int, size: int, length: int) -> np.ndarray | int | None:
        if self.crop_samples is None:
            return None
        span = length - self.crop_samples
        if self.crop == "start":
            return 0
        if self.crop == "center":
            return span // 2
        rng = np.random.default_rng([self.seed, epoch, b, self.rank, _CROP_SALT])
        return rng.integers(0, span + 1, size=size)

    def _gather(self, rs: RecordSet, rows: np.ndarray, starts) -> np.ndarray:
        signals = rs.signals
        if starts is None:
            return signals[rows]
        n = self.crop_samples
        if np.isscalar(starts) or isinstance(starts, int):
            return signals[:, :, int(starts):int(starts) + n][rows]
        # one gather through a strided window view: [rows, every lead, start] -> [B, L, n]
        windows = sliding_window_view(signals, n, axis=-1)
        return windows[rows[:, None], np.arange(signals.shape[1])[None, :], np.asarray(starts)[:, None]]

    def _make_batch(self, epoch: int, b: int, part_ids: np.ndarray, rows: np.ndarray) -> Batch:
        sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
        pid, row = part_ids[sl], rows[sl]
        size = len(row)
        length = int(self.parts[0].signals.shape[-1])
        starts = self._crop_starts(epoch, b, size, length)
        if len(self.parts) == 1:
            signal = self._gather(self.parts[0], row, starts)
        else:
            out_len = self.crop_samples or length
            signal = np.empty((size, self.parts[0].signals.shape[1], out_len), dtype=np.float32)
            for k, rs in enumerate(self.parts):
                sel = np.flatnonzero(pid == k)
                if len(sel):
                    part_starts = starts[sel] if isinstance(starts, np.ndarray) else starts
                    signal[sel] = self._gather(rs, row[sel], part_starts)
        labels = None
        if self._labelled:
            labels = np.empty((size, self.parts[0].labels.shape[1]), dtype=np.float32)
            for k, rs in enumerate(self.parts):
                sel = np.flatnonzero(pid == k)
                labels[sel] = rs.labels[row[sel]]
        record_ids = [None] * size
        patient_ids = [None] * size
        extra = {key: np.empty(size, dtype=np.float32) for key in self._extra_keys}
        for k, rs in enumerate(self.parts):
            sel = np.flatnonzero(pid == k)
            if not len(sel):
                continue
            r = row[sel]
            for i, v in zip(sel, rs.record_ids[r].tolist()):
                record_ids[i] = v
            for i, v in zip(sel, rs.patient_ids[r].tolist()):
                patient_ids[i] = v
            for key in self._extra_keys:
                extra[key][sel] = rs.extra[key][r]
        tensors = {key: torch.from_numpy(v) for key, v in extra.items()}
        if len(self.parts) > 1:
            tensors["mixture_part"] = torch.from_numpy(pid.astype(np.float32))
        rs0 = self.parts[0]
        return Batch(
            signal=torch.from_numpy(np.ascontiguousarray(signal, dtype=np.float32)),
            leads=tuple(rs0.leads),
            sampling_rate=float(rs0.sampling_rate),
            labels=None if labels is None else torch.from_numpy(labels),
            record_ids=record_ids,
            patient_ids=patient_ids,
            extra=tensors,
        )

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        epoch, start, n_batches = self.epoch, self.position, len(self)
        part_ids, rows = self._plan(epoch)
        if self.prefetch and n_batches - start > 1:
            produced = self._prefetched(epoch, start, n_batches, part_ids, rows)
        else:
            produced = (self._make_batch(epoch, b, part_ids, rows) for b in range(start, n_batches))
        try:
            for b, batch in zip(range(start, n_batches), produced):
                self.position = b + 1
                yield batch
        finally:
            if hasattr(produced, "close"):
                produced.close()
        if self.epoch == epoch and self.position >= n_batches:
            self.epoch, self.position = epoch + 1, 0

    def _prefetched(self, epoch, start, n_batches, part_ids, rows):
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            try:
                for b in range(start, n_batches):
                    item = self._make_batch(epoch, b, part_ids, rows)
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                q.put(exc)

        thread = threading.Thread(target=produce, name="ssl4ecg-prefetch", daemon=True)
        thread.start()
        try:
            for _ in range(start, n_batches):
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


class BatchLoader(_Loader):
    """Batches of one RecordSet, deterministic per ``(seed, epoch)``, resumable and rank-sharded.

    ``indices`` restricts the loader to some records (e.g. the pretraining splits) without
    copying a memory-mapped cache; ``crop_samples`` cuts windows of that many samples
    (``crop`` = ``random`` per sample and batch, or ``start`` / ``center``); ``prefetch``
    batches are built ahead in a background thread (0 = off).
    """

    def __init__(
        self,
        records: RecordSet,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        crop_samples: int | None = None,
        crop: str = "random",
        indices: Sequence[int] | np.ndarray | None = None,
        prefetch: int = 2,
    ) -> None:
        index = np.arange(len(records)) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= len(records)):
            raise ConfigError(f"loader indices must lie in [0, {len(records)}).")
        self.shuffle = bool(shuffle)
        super().__init__([records], [index], batch_size, drop_last=drop_last, seed=seed, rank=rank,
                         world_size=world_size, crop_samples=crop_samples, crop=crop, prefetch=prefetch)

    @property
    def records(self) -> RecordSet:
        """The RecordSet batches are drawn from."""
        return self.parts[0]

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.indices[0]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, _ORDER_SALT]).permutation(len(index))
        else:
            order = np.arange(len(index))
        rows = index[_shard(order, self.rank, self.world_size, self.drop_last)]
        return np.zeros(len(rows), dtype=np.int64), rows


class MixtureLoader(_Loader):
    """Batches drawn from several RecordSets with sampling weights (pretraining on a mixture).

    Each epoch has ``samples_per_epoch`` samples (default: all records of all parts); the
    part of every sample is drawn with probability proportional to ``weights`` from a
    generator seeded by ``(seed, epoch)``, and each part hands out its records in its own
    seeded permutation, starting a new permutation when exhausted. Batches mix parts and
    carry ``extra['mixture_part']``; labels are kept only when every part has the same
    classes. Sharding, crops, state and prefetch work as in :class:`BatchLoader`.
    """

    def __init__(
        self,
        parts: Sequence[RecordSet],
        weights: Sequence[float],
        batch_size: int,
        *,
        samples_per_epoch: int | None = None,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        crop_samples: int | None = None,
        crop: str = "random",
        indices: Sequence[Sequence[int] | np.ndarray | None] | None = None,
        prefetch: int = 2,
    ) -> None:
        if not parts:
            raise ConfigError("a mixture needs at least one RecordSet.")
        if len(weights) != len(parts):
            raise ConfigError(f"{len(parts)} mixture parts but {len(weights)} weights.")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ConfigError(f"mixture weights must be non-negative with a positive sum, got {list(weights)}.")
        indices = indices or [None] * len(parts)
        index = [np.arange(len(rs)) if ix is None else np.asarray(ix, dtype=np.int64)
                 for rs, ix in zip(parts, indices)]
        for k, (ix, wk) in enumerate(zip(index, w)):
            if wk > 0 and len(ix) == 0:
                raise ConfigError(f"mixture part {k} has weight {wk} but no record.")
        self.weights = w / w.sum()
        self.samples_per_epoch = None if samples_per_epoch is None else int(samples_per_epoch)
        super().__init__(parts, index, batch_size, drop_last=drop_last, seed=seed, rank=rank,
                         world_size=world_size, crop_samples=crop_samples, crop=crop, prefetch=prefetch)

    def _epoch_size(self) -> int:
        return self.samples_per_epoch or self.n_records

    def state_dict(self) -> dict:
        """As :meth:`BatchLoader.state_dict`, plus the mixture weights."""
        return {**super().state_dict(), "weights": [round(float(x), 12) for x in self.weights]}

    def load_state_dict(self, state: dict) -> None:
        """Resume; refuses a checkpoint taken with other mixture weights."""
        if "weights" in state and [round(float(x), 12) for x in state["weights"]] != \
                [round(float(x), 12) for x in self.weights]:
            raise ConfigError(f"cannot resume the mixture loader: weights were {state['weights']}, "
                              f"now {self.weights.tolist()}.")
        super().load_state_dict(state)

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        n = self._epoch_size()
        rng = np.random.default_rng([self.seed, epoch, _MIX_SALT])
        part_ids = rng.choice(len(self.parts), size=n, p=self.weights)
        rows = np.empty(n, dtype=np.int64)
        for k, index in enumerate(self.indices):
            where = np.flatnonzero(part_ids == k)
            if not len(where):
                continue
            part_rng = np.random.default_rng([self.seed, epoch, k, _MIX_SALT])
            reps = -(-len(where) // len(index))
            order = np.concatenate([part_rng.permutation(len(index)) for _ in range(reps)])
            rows[where] = index[order[: len(where)]]
        keep = _shard(np.arange(n), self.rank, self.world_size, self.drop_last)
        return part_ids[keep], rows[keep]
