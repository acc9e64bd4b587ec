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

Batches are built by indexing numpy arrays (memory maps of caches included; float16 caches
are converted per batch) and are always float32. They are built either by a background
thread (``prefetch`` batches ahead) or, with ``workers > 0``, by that many worker processes
(``torch.utils.data.DataLoader`` over the epoch's batch numbers). Since batch ``b`` is a pure
function of ``(seed, epoch, b, rank)``, workers change neither the batches nor the state.
``pin_memory`` hands out page-locked batches (when CUDA is available) so that
``batch.to("cuda", non_blocking=True)`` overlaps the copy with compute.

Workers are forked where the platform can (they inherit the memory maps: nothing is copied);
a start method that pickles the loader (``spawn``, ``forkserver``) reopens memory-mapped
signals by path in each worker. Workers exit when the iteration ends or is closed early and
with the parent process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import mmap
import multiprocessing
import os
import queue
import signal
import sys
import threading
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided

from ssl4ecg.data.records import RecordSet
from ssl4ecg.errors import ConfigError, DataError
from ssl4ecg.interfaces import Batch, SignalSpec

log = logging.getLogger("ssl4ecg.data")

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


# ------------------------------------------------------------------ memory maps across pickling

def _file_region(array: np.ndarray) -> tuple | None:
    """Where a memory-mapped array (or a view of one) lies in its file; ``None`` if not mapped.

    ``(path, byte position of the first element, shape, strides, dtype, file size, mtime)``.
    """
    mm = getattr(array, "_mmap", None)
    if not isinstance(array, np.memmap) or mm is None or not array.filename:
        return None
    mapped_at = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    file_start = array.offset - array.offset % mmap.ALLOCATIONGRANULARITY  # where np.memmap mapped from
    position = file_start + (array.ctypes.data - mapped_at)
    st = os.stat(array.filename)
    return (str(array.filename), int(position), tuple(array.shape), tuple(array.strides), array.dtype.str,
            st.st_size, st.st_mtime_ns)


def _reopen(region: tuple) -> np.ndarray:
    """The read-only memory-mapped view described by :func:`_file_region`."""
    path, position, shape, strides, dtype, size, mtime = region
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DataError(f"the loader's memory-mapped file {path} cannot be reopened in a worker ({exc}); "
                        f"keep caches in place while training") from None
    if (st.st_size, st.st_mtime_ns) != (size, mtime):
        raise DataError(f"{path} changed after the loader opened it; a cache must not be rewritten "
                        f"while a run reads it")
    dtype = np.dtype(dtype)
    whole = np.memmap(path, dtype=np.uint8, mode="r")
    count = (len(whole) - position) // dtype.itemsize
    extent = sum((n - 1) * abs(s) for n, s in zip(shape, strides)) + dtype.itemsize if all(shape) else 0
    if count * dtype.itemsize < extent or min(strides, default=0) < 0:
        raise DataError(f"cannot reopen a view of {path} at byte {position}: it does not fit the file")
    base = whole[position:position + count * dtype.itemsize].view(dtype)
    return as_strided(base, shape=shape, strides=strides, subok=True, writeable=False)


def _portable(rs: RecordSet) -> tuple[dict, tuple | None, np.ndarray | None]:
    """A RecordSet as pickled for a spawned worker: memory-mapped signals travel as a file region."""
    fields = {f.name: getattr(rs, f.name) for f in dataclasses.fields(rs) if f.name != "signals"}
    region = _file_region(rs.signals)
    return fields, region, (rs.signals if region is None else None)


def _restore(item: tuple) -> RecordSet:
    fields, region, signals = item
    return RecordSet(signals=_reopen(region) if region is not None else signals, **fields)


def _die_with(parent: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: end this worker when ``parent`` ends, even by SIGKILL.

    DataLoader's own watchdog compares the parent pid with the one it saw at start, which
    misses a parent killed while the worker was still starting (the worker then waits
    forever). ``PR_SET_PDEATHSIG`` covers that window on Linux; the pid check covers a parent
    gone before it was set.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl in this libc
            pass
    if os.getppid() != parent:
        os._exit(1)


def _as_is(item):
    """DataLoader ``collate_fn`` that keeps numpy arrays as they are (pickled inline)."""
    return item


class _EpochBatches(torch.utils.data.Dataset):
    """The batches of one epoch by number, for ``DataLoader(batch_size=None)`` workers.

    Worker processes write batch ``b``'s signal into the shared slot ``b % len(slots)`` and
    return only the small fields; the parent copies the slot out before it asks for the next
    batch. ``DataLoader`` keeps at most ``prefetch_factor * num_workers`` batches beyond the one
    handed out, so with one slot more than that a slot is never rewritten before it is read;
    ``stamps`` (the batch each slot was last given to) lets the parent check it.
    """

    def __init__(self, loader: "_Loader", epoch: int, part_ids: np.ndarray, rows: np.ndarray,
                 slots: torch.Tensor, stamps: torch.Tensor) -> None:
        self.loader, self.epoch, self.part_ids, self.rows = loader, epoch, part_ids, rows
        self.slots, self.stamps = slots, stamps

    def __len__(self) -> int:
        return len(self.loader)

    def __getitem__(self, b: int):
        b = int(b)
        s = b % len(self.slots)
        self.stamps[s] = b  # before writing: a reader of an older batch in this slot sees the change
        batch = self.loader._make_batch(self.epoch, b, self.part_ids, self.rows, into=self.slots[s])
        labels = None if batch.labels is None else batch.labels.numpy()
        extra = {k: v.numpy() for k, v in batch.extra.items()}  # numpy: pickled inline, no shared segment
        return b, s, len(batch), labels, extra, batch.record_ids, batch.patient_ids


class _Loader:
    """Shared machinery: epoch/position state, batch assembly, prefetching."""

    def __init__(self, parts: Sequence[RecordSet], indices: Sequence[np.ndarray], batch_size: int, *,
                 drop_last: bool, seed: int, rank: int, world_size: int, crop_samples: int | None,
                 crop: str, prefetch: int, workers: int = 0, pin_memory: bool = False,
                 start_method: str | None = None) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size}).")
        if crop not in CROP_MODES:
            raise ConfigError(f"loader crop '{crop}' is not one of {', '.join(CROP_MODES)}.")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ConfigError(f"loader workers must be an integer >= 0 (0 = a background thread), got {workers!r}.")
        methods = multiprocessing.get_all_start_methods()
        if start_method is not None and start_method not in methods:
            raise ConfigError(f"loader start_method {start_method!r} is not one of {', '.join(methods)}.")
        first = parts[0]
        for rs in parts:
            if not isinstance(rs.signals, np.ndarray) or rs.signals.ndim != 3:
                raise ConfigError("the loader needs preprocessed records [N, leads, T]; "
                                  "load them with ssl4ecg.data.build.load_records")
            if rs.signals.dtype not in (np.float32, np.float16):
                raise ConfigError(f"the loader reads float32 or float16 signals, got {rs.signals.dtype}; "
                                  f"convert the records with np.asarray(..., dtype=np.float32)")
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
        self.workers = workers
        self.pin_memory = bool(pin_memory)
        self.start_method = start_method
        if self.pin_memory and not torch.cuda.is_available():
            log.info("loader pin_memory is on but CUDA is not available: batches stay in pageable memory")
        self._views()
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

    def __getstate__(self) -> dict:
        """Pickled (for spawned workers) without copying memory maps: they are reopened by path."""
        state = dict(self.__dict__)
        state["parts"] = [_portable(rs) for rs in self.parts]
        del state["_arrays"], state["_halves"]
        state.pop("_slot_cache", None)
        return state

    def __setstate__(self, state: dict) -> None:
        state["parts"] = [_restore(item) for item in state["parts"]]
        self.__dict__.update(state)
        self._views()

    def _views(self) -> None:
        """Plain numpy views of the signals (indexing skips np.memmap's overhead) and torch views
        of the float16 ones (converted to float32 row by row)."""
        self._arrays = [np.asarray(rs.signals) for rs in self.parts]
        with warnings.catch_warnings():  # read-only memory maps: only ever read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self._halves = [torch.from_numpy(a) if a.dtype == np.float16 else None for a in self._arrays]

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

    def _pinning(self) -> bool:
        return self.pin_memory and torch.cuda.is_available()

    def _alloc(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, np.ndarray]:
        """The float32 batch signal to fill, as (tensor, numpy view of the same memory):
        page-locked when pinning, else in numpy's heap (which recycles freed batches)."""
        if self._pinning():
            out = torch.empty(shape, dtype=torch.float32, pin_memory=True)
            return out, out.numpy()
        arr = np.empty(shape, dtype=np.float32)
        return torch.from_numpy(arr), arr

    def _fill(self, signal: torch.Tensor, out: np.ndarray, pid: np.ndarray, row: np.ndarray, starts) -> None:
        """Write the batch's (cropped) records into ``signal`` / ``out`` (the same float32 memory).

        One copy per record: a single float32 part with a common window goes through
        ``np.take``; anything else record by record, float16 rows through torch's vectorised
        conversion.
        """
        n = out.shape[-1]
        if starts is None or not isinstance(starts, np.ndarray):
            lo = 0 if starts is None else int(starts)
            if len(self._arrays) == 1 and self._arrays[0].dtype == np.float32:
                np.take(self._arrays[0][:, :, lo:lo + n], row, axis=0, out=out, mode="clip")  # rows are in range
                return
            starts = np.full(len(row), lo)
        for i, (k, r, a) in enumerate(zip(pid.tolist(), row.tolist(), starts.tolist())):
            half = self._halves[k]
            if half is None:
                out[i] = self._arrays[k][r, :, a:a + n]
            else:
                signal[i].copy_(half[r, :, a:a + n])

    def _make_batch(self, epoch: int, b: int, part_ids: np.ndarray, rows: np.ndarray,
                    into: torch.Tensor | None = None) -> Batch:
        """Batch ``b`` of ``epoch``; its signal is written into ``into[:size]`` when given."""
        sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
        pid, row = part_ids[sl], rows[sl]
        size = len(row)
        length = int(self.parts[0].signals.shape[-1])
        starts = self._crop_starts(epoch, b, size, length)
        if into is None:
            signal, out = self._alloc((size, self.parts[0].signals.shape[1], self.crop_samples or length))
        else:
            signal = into[:size]
            out = signal.numpy()
        self._fill(signal, out, pid, row, starts)
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
        batch = Batch(
            signal=signal,
            leads=tuple(rs0.leads),
            sampling_rate=float(rs0.sampling_rate),
            labels=None if labels is None else torch.from_numpy(labels),
            record_ids=record_ids,
            patient_ids=patient_ids,
            extra=tensors,
        )
        if into is None and self._pinning():  # (never asked in a worker) the signal already is pinned
            batch = batch.pin_memory()
        return batch

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        epoch, start, n_batches = self.epoch, self.position, len(self)
        part_ids, rows = self._plan(epoch)
        if self.workers and n_batches - start > 0:
            produced = self._from_workers(epoch, start, n_batches, part_ids, rows)
        else:
            produced = (self._make_batch(epoch, b, part_ids, rows) for b in range(start, n_batches))
        if self.prefetch and n_batches - start > 1:
            # a thread builds the batches (or copies them out of the workers' slots) ahead
            produced = self._prefetched(produced, n_batches - start)
        try:
            for b, batch in zip(range(start, n_batches), produced):
                self.position = b + 1
                yield batch
        finally:
            if hasattr(produced, "close"):
                produced.close()
        if self.epoch == epoch and self.position >= n_batches:
            self.epoch, self.position = epoch + 1, 0

    def _slots(self, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared-memory batch slots (reused from the last iteration when it has finished)."""
        shape = (n_slots, self.batch_size, self.parts[0].signals.shape[1],
                 self.crop_samples or int(self.parts[0].signals.shape[-1]))
        cached = self.__dict__.pop("_slot_cache", None)
        if cached is not None and tuple(cached[0].shape) == shape:
            return cached
        return (torch.empty(shape, dtype=torch.float32).share_memory_(),
                torch.full((n_slots,), -1, dtype=torch.int64).share_memory_())

    def _from_workers(self, epoch, start, n_batches, part_ids, rows):
        """Batches ``start..n_batches-1`` built by worker processes, in order (see _EpochBatches)."""
        from torch.utils.data import DataLoader

        method = self.start_method or ("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        n_workers = min(self.workers, n_batches - start)
        factor = max(1, self.prefetch)
        slots, stamps = self._slots(factor * n_workers + 1)
        loader = DataLoader(
            _EpochBatches(self, epoch, part_ids, rows, slots, stamps),
            batch_size=None,
            sampler=range(start, n_batches),
            num_workers=n_workers,
            prefetch_factor=factor,
            collate_fn=_as_is,
            worker_init_fn=functools.partial(_die_with, os.getpid()),
            multiprocessing_context=multiprocessing.get_context(method),
            # DataLoader draws its workers' base seed from this generator, never from the global
            # one, so that the workers leave the caller's random streams untouched
            generator=torch.Generator().manual_seed(self.seed),
        )
        rs0 = self.parts[0]
        slot_arrays = slots.numpy()
        batches = iter(loader)
        try:
            for b, s, size, labels, extra, record_ids, patient_ids in batches:
                signal, out = self._alloc((size,) + tuple(slots.shape[2:]))
                np.copyto(out, slot_arrays[s, :size])  # one thread (torch's copy_ may spin OpenMP threads)
                if int(stamps[s]) != b:
                    raise RuntimeError(f"loader slot {s} was rewritten (batch {int(stamps[s])}) while batch {b} "
                                       f"was read from it; this torch's DataLoader prefetches more than "
                                       f"prefetch_factor * num_workers batches: use workers = 0")
                batch = Batch(signal=signal, leads=tuple(rs0.leads), sampling_rate=float(rs0.sampling_rate),
                              labels=None if labels is None else torch.from_numpy(labels),
                              record_ids=record_ids, patient_ids=patient_ids,
                              extra={k: torch.from_numpy(v) for k, v in extra.items()})
                yield batch.pin_memory() if self._pinning() else batch
        finally:
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:  # joins the workers now rather than at garbage collection
                shutdown()
            self._slot_cache = (slots, stamps)

    def _prefetched(self, items: Iterator[Batch], count: int):
        """``count`` batches of ``items``, drawn ``prefetch`` ahead by a background thread.

        The thread also closes ``items`` (stopping the workers, if any) before the iteration
        is over, whether it ran to the end or was closed early.
        """
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            try:
                for item in items:
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
            finally:
                if hasattr(items, "close"):
                    items.close()  # in this thread, which runs it: joins worker processes

        thread = threading.Thread(target=produce, name="ssl4ecg-prefetch", daemon=True)
        thread.start()
        try:
            for _ in range(count):
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
    batches are built ahead in a background thread (0 = off), or, with ``workers`` > 0, by
    that many processes (``prefetch`` batches ahead each; same batches, same state);
    ``pin_memory`` gives page-locked batches when CUDA is available. ``start_method`` picks
    how workers start (default ``fork`` where available, else ``spawn``).
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
        workers: int = 0,
        pin_memory: bool = False,
        start_method: str | None = None,
    ) -> None:
        index = np.arange(len(records)) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= len(records)):
            raise ConfigError(f"loader indices must lie in [0, {len(records)}).")
        self.shuffle = bool(shuffle)
        super().__init__([records], [index], batch_size, drop_last=drop_last, seed=seed, rank=rank,
                         world_size=world_size, crop_samples=crop_samples, crop=crop, prefetch=prefetch,
                         workers=workers, pin_memory=pin_memory, start_method=start_method)

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
    classes. Sharding, crops, state, prefetch, workers and pinning work as in :class:`BatchLoader`.
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
        workers: int = 0,
        pin_memory: bool = False,
        start_method: str | None = None,
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
                         world_size=world_size, crop_samples=crop_samples, crop=crop, prefetch=prefetch,
                         workers=workers, pin_memory=pin_memory, start_method=start_method)

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
