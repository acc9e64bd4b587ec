"""Prepared dataset caches: preprocessed records as a memory-mappable ``.npy`` + metadata.

A cache folder holds

* ``signals.npy`` -- ``[N, leads, T]`` float32 (or float16 with ``dtype="float16"``: half
  the size; readers convert batches to float32), records ordered by split (train, val, test,
  unassigned) and, inside a split, in the source's order, so that a split is one contiguous
  block of the memory map;
* ``labels.npy`` -- ``[N, C]`` float32 multi-hot (labelled sources only);
* ``meta.npz`` -- ``record_ids``, ``patient_ids``, ``splits`` and ``extra_<name>`` arrays;
* ``manifest.json`` -- written last and atomically: format and versions, source and its
  options, preprocessing, shape, class names, counts, per-lead train-split statistics,
  SHA-256 checksums of the files above, their sizes and sampled-page digests (``checks``),
  notes, every dropped record with its reason, and a digest of the manifest itself.

:func:`open_cache` (and ``ssl4ecg data info``) checks each file's size, the ``.npy`` header,
the sampled-page digests and a sample of records for NaN/inf (milliseconds); a missing or damaged
file is one :class:`DataError` naming it. :func:`verify_cache` (``data info --verify``) reads
every byte: full SHA-256 and a NaN/inf scan. Caches written before the checks still open.

:func:`prepare_cache` works in shards of records processed in parallel processes; each
finished shard is saved under ``.work/`` (signal file first, its record list last, both by
atomic rename), so an interrupted prepare resumes with the unfinished shards only (a shard
whose files are damaged or truncated is processed again; ``force`` reuses none). Workers die
with the process that started them. A
folder without ``manifest.json`` is never taken for a cache. While the workers run, the
source's listing waits in ``.work/entries_*.pkl`` (one file per shard, read by the worker
that processes it) instead of the parent's memory, so that the forked workers do not inherit
it: memory stays flat in the number of records.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import gc
import hashlib
import io
import json
import logging
import multiprocessing
import os
import pickle
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ssl4ecg.data.preprocess import FLAT_STD, Preprocessing, process_record, warm_up
from ssl4ecg.data.records import RecordSet
from ssl4ecg.data.sources.base import (
    RecordEntry, RecordSetSource, RecordSource, Scan, _first_reasons, extra_arrays, label_matrix,
)
from ssl4ecg.errors import ConfigError, DataError

log = logging.getLogger("ssl4ecg.data")

FORMAT = "ssl4ecg-cache"
FORMAT_VERSION = 1
SHARD_SIZE = 256
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
CACHE_FILES = ("signals.npy", "labels.npy", "meta.npz", "manifest.json")
WORK = ".work"
#: storage types of ``signals.npy`` (``prepare_cache(dtype=...)``, ``[data] cache_dtype``)
CACHE_DTYPES = ("float32", "float16")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def check_cache_dtype(dtype: str) -> str:
    """``dtype`` if it is a cache storage type, else a :class:`ConfigError` listing them."""
    if dtype not in CACHE_DTYPES:
        raise ConfigError(f"cache dtype {dtype!r} is not one of {', '.join(CACHE_DTYPES)} "
                          f"(float16 halves the cache; batches are float32 either way).")
    return dtype


def to_storage(signals: np.ndarray, dtype: str, record_ids: Sequence[str] = ()) -> np.ndarray:
    """``signals`` as the cache's storage type; values beyond float16's range are refused."""
    if dtype == "float32":
        return np.asarray(signals, dtype=np.float32)
    peak = np.abs(signals).max(axis=tuple(range(1, signals.ndim))) if signals.size else np.zeros(0)
    over = np.flatnonzero(peak > _FLOAT16_MAX)
    if len(over):
        i = int(over[0])
        rid = record_ids[i] if i < len(record_ids) else f"#{i}"
        raise DataError(f"record {rid} reaches |x| = {float(peak[i]):.6g}, beyond float16's range "
                        f"({_FLOAT16_MAX:g}); prepare with cache_dtype = \"float32\" or normalise the records")
    return signals.astype(np.float16)


# ----------------------------------------------------------------------------- processing

@dataclass
class ShardResult:
    """Preprocessed records of one shard: signals of the kept ones, the reasons for the rest."""

    signals: np.ndarray  # [n_kept, L, T]
    positions: list[int]  # entry index of each kept record
    dropped: list[tuple[int, str]]  # (entry index, reason)
    extras: dict[int, dict]  # metadata found while reading (entry index -> values)


def process_entries(
    source: RecordSource, entries: Sequence[RecordEntry], positions: Sequence[int], pp: Preprocessing
) -> ShardResult:
    """Read and preprocess ``entries``; a record that fails is dropped with its reason."""
    kept, kept_pos, dropped, extras = [], [], [], {}
    for pos, entry in zip(positions, entries):
        try:
            raw = source.read(entry)
            x = process_record(raw.signal, raw.leads, raw.sampling_rate, pp,
                               record_id=entry.record_id, split=entry.split)
        except DataError as exc:
            dropped.append((pos, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - one unreadable record must not stop the rest
            dropped.append((pos, f"unexpected {type(exc).__name__} while reading: {exc}"))
            continue
        kept.append(x)
        kept_pos.append(pos)
        if raw.extra:
            extras[pos] = raw.extra
    shape = (len(kept), len(pp.leads), pp.n_samples)
    signals = np.stack(kept) if kept else np.zeros(shape, dtype=np.float32)
    return ShardResult(signals, kept_pos, dropped, extras)


def _split_rank(split: str) -> int:
    return SPLIT_ORDER.get(split, 3)


def cache_order(entries: Sequence[RecordEntry], positions: Sequence[int]) -> list[int]:
    """Kept entry positions ordered by split (train, val, test, unassigned), then listing order."""
    return sorted(positions, key=lambda p: (_split_rank(entries[p].split), p))


def _metadata(entries: Sequence[RecordEntry], order: Sequence[int], class_names, extras: dict[int, dict]):
    chosen = [entries[p] for p in order]
    merged = [{**e.extra, **extras.get(p, {})} for p, e in zip(order, chosen)]
    return dict(
        record_ids=np.array([e.record_id for e in chosen], dtype=str),
        patient_ids=np.array([e.patient_id or e.record_id for e in chosen], dtype=str),
        splits=np.array([e.split for e in chosen], dtype="<U5"),
        labels=label_matrix([e.labels for e in chosen], class_names),
        extra=extra_arrays(merged),
    )


def as_record_source(source, name: str) -> RecordSource:
    """``source`` itself if it lists records, else a wrapper around its ``load()``."""
    return source if isinstance(source, RecordSource) else RecordSetSource(source, name)


def read_in_memory(source, name: str, pp: Preprocessing, notes: list[str] | None = None) -> RecordSet:
    """Read and preprocess every record of ``source`` in this process (no cache)."""
    src = as_record_source(source, name)
    src.prefer_rate(pp.sampling_rate)
    scan = src.scan()
    for note in scan.notes:
        log.warning(note)
    if notes is not None:
        notes.extend(scan.notes)
    result = process_entries(src, scan.entries, range(len(scan.entries)), pp)
    dropped = list(scan.dropped) + [(scan.entries[p].record_id, r) for p, r in result.dropped]
    if not result.positions:
        raise DataError(f"source '{name}': no usable record. {_first_reasons(dropped)}")
    order = cache_order(scan.entries, result.positions)
    row_of = {p: i for i, p in enumerate(result.positions)}
    meta = _metadata(scan.entries, order, scan.class_names, result.extras)
    signals = result.signals[[row_of[p] for p in order]]
    return RecordSet(signals=signals, leads=pp.leads, sampling_rate=pp.sampling_rate,
                     record_ids=meta["record_ids"], patient_ids=meta["patient_ids"],
                     splits=meta["splits"], labels=meta["labels"],
                     class_names=tuple(scan.class_names or ()), extra=meta["extra"], dropped=dropped,
                     integrity=dict(scan.integrity))


# ----------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when its parent dies (Linux), and exit now if the
    parent is already gone; elsewhere :func:`_run_shard` checks the parent between shards."""
    if sys.platform.startswith("linux"):
        try:
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl
            pass
    _exit_if_orphaned(parent)


def _exit_if_orphaned(parent: int | None) -> None:
    if parent is not None and os.getppid() != parent:
        os._exit(1)  # the prepare that started this worker is gone: stop writing shards


def _init_worker(source: RecordSource, pp: Preprocessing, work: str, in_child: bool = True,
                 dtype: str = "float32", parent: int | None = None) -> None:
    if in_child:
        if parent is not None:
            _die_with_parent(parent)
        source.worker_init()
    _WORKER.update(source=source, pp=pp, work=Path(work), dtype=dtype, parent=parent if in_child else None)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def _shard_paths(work: Path, k: int) -> tuple[Path, Path]:
    return work / f"shard_{k:06d}.npy", work / f"shard_{k:06d}.json"


def _write_shard(work: Path, k: int, result: ShardResult) -> None:
    npy, meta = _shard_paths(work, k)
    tmp = npy.with_name(npy.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, result.signals)
    os.replace(tmp, npy)
    payload = {"positions": result.positions, "dropped": result.dropped,
               "extras": {str(p): _jsonable(v) for p, v in result.extras.items()}}
    _atomic_json(meta, payload)


def _shard_ok(work: Path, k: int, n_entries: int, shape: tuple[int, int], dtype: str) -> bool:
    """Whether shard ``k`` of an earlier run is finished and intact (its record list readable,
    its signal file with a readable header, the expected shape and the full size); a damaged
    shard's files are deleted, so that it is processed again."""
    npy, meta = _shard_paths(work, k)
    if not meta.exists():
        return False
    try:
        info = json.loads(meta.read_text())
        kept = info["positions"]
        ok = isinstance(kept, list) and len(kept) + len(info["dropped"]) == n_entries
        with open(npy, "rb") as fh:
            major, _ = np.lib.format.read_magic(fh)
            header = (np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0)(fh)
            offset = fh.tell()
        arr_shape, fortran, arr_dtype = header
        expected = offset + int(np.prod(arr_shape, dtype=np.int64)) * arr_dtype.itemsize
        ok = ok and not fortran and arr_dtype == np.dtype(dtype) and tuple(arr_shape) == (len(kept), *shape) \
            and npy.stat().st_size == expected
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        ok = False
    if not ok:
        log.warning("shard %d in %s is damaged or incomplete; processing it again", k, work)
        meta.unlink(missing_ok=True)
        npy.unlink(missing_ok=True)
    return ok


def _entries_path(work: Path, k: int) -> Path:
    return work / f"entries_{k:06d}.pkl"


def _save_entries(work: Path, shards, entries: Sequence[RecordEntry]) -> None:
    """Each shard's entries in a file of its own (pickled), read by the worker that processes it."""
    for k, pos in shards:
        path = _entries_path(work, k)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            pickle.dump([entries[p] for p in pos], fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)


def _load_entries(work: Path, shards) -> dict[int, RecordEntry]:
    """Every shard's entries again, by position (for assembling, once the workers are done)."""
    out: dict[int, RecordEntry] = {}
    for k, pos in shards:
        with open(_entries_path(work, k), "rb") as fh:
            out.update(zip(pos, pickle.load(fh)))
    return out


def _release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS before forking workers, so that
    they do not inherit (and count) the parent's dead pages."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # pragma: no cover - not glibc
            pass


def _run_shard(k: int, positions: list[int]) -> tuple[int, int, int]:
    """Worker task: process one shard (its entries read from the work folder) and save it;
    returns (shard, kept, dropped)."""
    _exit_if_orphaned(_WORKER.get("parent"))
    with open(_entries_path(_WORKER["work"], k), "rb") as fh:
        entries = pickle.load(fh)
    result = process_entries(_WORKER["source"], entries, positions, _WORKER["pp"])
    rid = {p: e.record_id for p, e in zip(positions, entries)}
    result.signals = to_storage(result.signals, _WORKER["dtype"], [rid[p] for p in result.positions])
    _write_shard(_WORKER["work"], k, result)
    return k, len(result.positions), len(result.dropped)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _atomic_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


#: sampled-page digests: this many blocks of this many bytes, evenly spaced (first and last included)
SAMPLE_BLOCKS = 16
SAMPLE_BLOCK = 1 << 16


def _sample_offsets(size: int, blocks: int = SAMPLE_BLOCKS, block: int = SAMPLE_BLOCK) -> list[int]:
    """Start of each sampled block; a file no bigger than all blocks together is read whole."""
    if size <= blocks * block:
        return list(range(0, size, block))
    return sorted({int(o) for o in np.linspace(0, size - block, blocks).round()})


def _sample_sha256(path: Path, size: int, blocks: int = SAMPLE_BLOCKS, block: int = SAMPLE_BLOCK) -> str:
    """SHA-256 over the sampled blocks of ``path`` (with their offsets and the file size)."""
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        for offset in _sample_offsets(size, blocks, block):
            fh.seek(offset)
            digest.update(offset.to_bytes(8, "little"))
            digest.update(fh.read(block))
    return digest.hexdigest()


def _file_checks(path: Path) -> dict:
    """Size and sampled-page digest of ``path`` (recorded in the manifest, checked at open)."""
    size = path.stat().st_size
    return {"size": size, "sample_sha256": _sample_sha256(path, size), "sample_blocks": SAMPLE_BLOCKS,
            "sample_block": SAMPLE_BLOCK}


def _manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON without its own digest (checked when read)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(_jsonable(body), sort_keys=True).encode()).hexdigest()


def default_workers(n_tasks: int) -> int:
    """Worker processes for ``n_tasks`` shards: every core, at most 8 and at most the tasks."""
    return max(1, min(os.cpu_count() or 1, 8, n_tasks))


def versions() -> dict[str, str]:
    """Versions of the software that wrote a cache (stored in its manifest)."""
    import scipy

    import ssl4ecg

    out = {"ssl4ecg": ssl4ecg.__version__, "python": platform.python_version(),
           "numpy": np.__version__, "scipy": scipy.__version__}
    for mod in ("wfdb", "h5py"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "?")
    return out


# ----------------------------------------------------------------------------- prepare

def _plan(name: str, options: dict, pp: Preprocessing, scan: Scan, shard_size: int,
          dtype: str = "float32") -> dict:
    digest = hashlib.sha256()
    for e in scan.entries:
        digest.update(json.dumps([e.record_id, str(e.locator), e.split, list(e.labels)]).encode())
        digest.update(b"\n")
    plan = {"format_version": FORMAT_VERSION, "source": name, "options": _jsonable(options),
            "preprocessing": pp.as_dict(), "entries": len(scan.entries),
            "entries_sha256": digest.hexdigest(), "shard_size": shard_size,
            "class_names": list(scan.class_names) if scan.class_names is not None else None}
    if dtype != "float32":  # float32 plans keep the hash of caches written before the option existed
        plan["dtype"] = dtype
    plan["plan_hash"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    return plan


def _check_out(out: Path, force: bool) -> dict | None:
    """The existing manifest of ``out`` (if any); refuse folders that are not caches."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder; choose a new cache folder")
    manifest_path = out / "manifest.json"
    ours = set(CACHE_FILES) | {WORK}
    foreign = [p.name for p in out.iterdir() if p.name not in ours and not p.name.endswith(".tmp")]
    if foreign and not manifest_path.exists():
        raise DataError(f"--out {out} is not empty and is not an ssl4ecg cache (it holds "
                        f"{', '.join(sorted(foreign)[:3])}); choose a new or empty folder")
    if manifest_path.exists():
        try:
            return json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            if not force:
                raise DataError(f"{manifest_path} is unreadable; pass --force to rebuild the cache") from None
    return None


def prepare_cache(
    source,
    name: str,
    options: dict,
    pp: Preprocessing,
    out: str | Path,
    *,
    workers: int = 0,
    progress: bool | Callable[[int, int], None] = False,
    force: bool = False,
    shard_size: int = SHARD_SIZE,
    dtype: str = "float32",
) -> dict:
    """Preprocess every record of ``source`` into the cache folder ``out``; return its manifest.

    Idempotent (an up-to-date cache is returned as is) and resumable (finished shards of an
    interrupted run are kept). ``workers`` = 0 uses every core (at most 8); ``progress`` is
    ``True`` for a rich progress bar or a callback ``(done, total)``. A cache prepared with
    other options is only replaced with ``force``. ``dtype`` is the storage type of
    ``signals.npy`` (:data:`CACHE_DTYPES`; float16 halves the file).
    """
    check_cache_dtype(dtype)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"workers = {workers!r} is invalid: give a number of processes >= 0 (0 = every core)")
    started = time.perf_counter()
    out = Path(out).expanduser()
    src = as_record_source(source, name)
    src.prefer_rate(pp.sampling_rate)
    scan = src.scan()
    t_scan = time.perf_counter()
    plan = _plan(name, options, pp, scan, shard_size, dtype)
    existing = _check_out(out, force)
    if existing is not None:
        if existing.get("plan_hash") == plan["plan_hash"] and not force:
            try:
                check_cache(out)
            except DataError as exc:  # the same data, damaged: prepared again (nothing to lose)
                log.warning("%s; preparing it again", exc)
            else:
                log.info("cache %s is up to date", out)
                return existing
        elif not force:
            raise ConfigError(
                f"{out} already holds a cache of {existing.get('source')} prepared with other options "
                f"or another version of the data; pass --force to replace it or choose another --out")
        # the old cache stays complete until _assemble swaps the new files in: a replacement
        # that fails or is interrupted before then leaves it readable
    out.mkdir(parents=True, exist_ok=True)
    work = out / WORK
    work.mkdir(exist_ok=True)
    plan_path = work / "plan.json"
    if force:  # --force starts clean: no shard of an earlier run is reused
        for stale in work.iterdir():
            stale.unlink()
    if plan_path.exists():
        try:
            old = json.loads(plan_path.read_text()).get("plan_hash")
        except (OSError, ValueError):
            old = None
        if old != plan["plan_hash"]:
            for stale in work.glob("shard_*"):
                stale.unlink()
    _atomic_json(plan_path, plan)

    n = len(scan.entries)
    shards = [(k, list(range(s, min(n, s + shard_size)))) for k, s in enumerate(range(0, n, shard_size))]
    shape = (len(pp.leads), pp.n_samples)
    todo = [(k, pos) for k, pos in shards if not _shard_ok(work, k, len(pos), shape, dtype)]
    done_records = n - sum(len(p) for _, p in todo)
    n_workers = default_workers(len(todo)) if workers <= 0 else max(1, min(workers, len(todo)))
    # the listing (about 1 KB per record) waits on disk while the workers run: forked after
    # it is gone, they do not inherit it, so memory stays flat in the dataset size
    _save_entries(work, shards, scan.entries)
    scan = replace(scan, entries=[])
    _release_memory()
    t_run = time.perf_counter()
    _run(src, pp, work, todo, n_workers, progress, done_records, n, dtype)
    t_assemble = time.perf_counter()
    scan = replace(scan, entries=_load_entries(work, shards))
    manifest = _assemble(out, work, scan, plan, pp, name, options, shards, dtype)
    done = time.perf_counter()
    manifest["prepare_seconds"] = round(done - started, 3)
    manifest["timings"] = {"scan": round(t_scan - started, 3), "process": round(t_assemble - t_run, 3),
                           "assemble": round(done - t_assemble, 3), "records_processed": sum(len(p) for _, p in todo)}
    manifest["workers"] = n_workers
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    _atomic_json(out / "manifest.json", manifest)
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return manifest


def _run(src, pp, work, todo, n_workers, progress, done, total, dtype="float32") -> None:
    warm_up(pp)  # before forking: the workers inherit scipy and the filter designs
    callback, bar = _progress(progress, total, done)
    try:
        if n_workers <= 1 or len(todo) <= 1:
            _init_worker(src, pp, str(work), in_child=False, dtype=dtype)
            for k, pos in todo:
                _, kept, dropped = _run_shard(k, pos)
                done += kept + dropped
                callback(done, total)
            return
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        initargs = (src, pp, str(work), True, dtype, os.getpid())  # the workers die with this process
        with cf.ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context(method),
                                    initializer=_init_worker, initargs=initargs) as pool:
            futures = [pool.submit(_run_shard, k, pos) for k, pos in todo]
            try:
                for fut in cf.as_completed(futures):
                    _, kept, dropped = fut.result()
                    done += kept + dropped
                    callback(done, total)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    finally:
        if bar is not None:
            bar.stop()


def _progress(progress, total: int, done: int):
    if callable(progress):
        return progress, None
    if not progress:
        return (lambda d, t: None), None
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    bar = Progress(TextColumn("[bold]preparing"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("records"), TimeElapsedColumn(), TimeRemainingColumn())
    task = bar.add_task("prepare", total=total, completed=done)
    bar.start()
    return (lambda d, t: bar.update(task, completed=d)), bar


def _assemble(out: Path, work: Path, scan: Scan, plan: dict, pp: Preprocessing, name: str,
              options: dict, shards, dtype: str = "float32") -> dict:
    """Join the shards into the final files (temp names, then rename); return the manifest."""
    kept_of: dict[int, list[int]] = {}
    dropped: list[tuple[str, str]] = list(scan.dropped)
    extras: dict[int, dict] = {}
    for k, _ in shards:
        meta = json.loads(_shard_paths(work, k)[1].read_text())
        kept_of[k] = meta["positions"]
        dropped.extend((scan.entries[p].record_id, reason) for p, reason in meta["dropped"])
        extras.update({int(p): v for p, v in meta["extras"].items()})
    positions = [p for k, _ in shards for p in kept_of[k]]
    if not positions:
        raise DataError(f"source '{name}': no usable record, nothing to cache. {_first_reasons(dropped)}")
    order = cache_order(scan.entries, positions)
    shape = (len(order), len(pp.leads), pp.n_samples)
    blocks = {}
    where: dict[int, tuple[int, int]] = {}
    for k, _ in shards:
        if not kept_of[k]:
            continue
        block = np.load(_shard_paths(work, k)[0], mmap_mode="r")
        if block.shape[0] != len(kept_of[k]) or block.shape[1:] != shape[1:] or block.dtype != np.dtype(dtype):
            raise DataError(f"shard {k} of {out} is inconsistent; delete {work} and prepare again")
        blocks[k] = block
        where.update({p: (k, j) for j, p in enumerate(kept_of[k])})
    # every new file is written under a temporary name first: the old cache (if any) stays
    # complete and readable until the new files are swapped in by renames at the end
    signals_tmp, signals_sha, stats = _write_signals(out / "signals.npy", shape, order, where, blocks,
                                                     scan.entries, dtype=dtype)
    del blocks

    meta = _metadata(scan.entries, order, scan.class_names, extras)
    staged = {"signals.npy": signals_tmp}
    if meta["labels"] is not None:
        staged["labels.npy"] = out / "labels.npy.tmp"
        with open(staged["labels.npy"], "wb") as fh:
            np.save(fh, meta["labels"])
    arrays = {"record_ids": meta["record_ids"], "patient_ids": meta["patient_ids"], "splits": meta["splits"],
              **{f"extra_{k}": v for k, v in meta["extra"].items()}}
    staged["meta.npz"] = out / "meta.npz.tmp"
    with open(staged["meta.npz"], "wb") as fh:
        np.savez(fh, **arrays)
    files = {f: signals_sha if f == "signals.npy" else _sha256(tmp) for f, tmp in staged.items()}
    checks = {f: _file_checks(tmp) for f, tmp in staged.items()}
    # the old manifest goes first, so that it never describes the new files
    (out / "manifest.json").unlink(missing_ok=True)
    for f, tmp in staged.items():
        os.replace(tmp, out / f)
    if "labels.npy" not in staged and (out / "labels.npy").exists():
        (out / "labels.npy").unlink()
    rs_labels = meta["labels"]
    counts = {
        "listed": len(scan.entries) + len(scan.dropped),
        "records": len(order),
        "dropped": len(dropped),
        "splits": {s: int((meta["splits"] == s).sum()) for s in ("train", "val", "test", "")},
    }
    if rs_labels is not None:
        counts["classes"] = {c: int(rs_labels[:, i].sum()) for i, c in enumerate(scan.class_names)}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": name,
        "options": _jsonable(options),
        "preprocessing": pp.as_dict(),
        "leads": list(pp.leads),
        "sampling_rate": pp.sampling_rate,
        "n_samples": pp.n_samples,
        "shape": list(shape),
        "dtype": dtype,
        "class_names": list(scan.class_names) if scan.class_names is not None else None,
        "counts": counts,
        "dataset_stats": stats,
        "files": files,
        "checks": checks,  # size and sampled-page digest per file: verified by every open_cache
        "versions": versions(),
        "notes": list(scan.notes),
        "integrity": dict(scan.integrity),  # duplicates dropped, paths and patients checked
        "plan_hash": plan["plan_hash"],
        "dropped": [[rid, reason] for rid, reason in dropped],
    }


def _write_signals(path: Path, shape, order, where, blocks, entries, chunk: int = 64, dtype: str = "float32"):
    """Write ``signals.npy`` (``dtype``) in cache order, hashing it and summing train statistics.

    Returns (the written file, its sha256, train statistics or ``None``); the file has a
    temporary name, the caller renames it to ``path``.
    """
    digest = hashlib.sha256()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                 "shape": tuple(shape)})
    n_leads = shape[1]
    total, total_sq, count = np.zeros(n_leads), np.zeros(n_leads), 0
    tmp = path.with_name(path.name + ".partial.tmp")
    with open(tmp, "wb") as fh:
        fh.write(header.getvalue())
        digest.update(header.getvalue())
        for start in range(0, len(order), chunk):
            rows = order[start:start + chunk]
            block = np.empty((len(rows),) + tuple(shape[1:]), dtype=dtype)
            for i, p in enumerate(rows):
                k, j = where[p]
                block[i] = blocks[k][j]
            train = [i for i, p in enumerate(rows) if entries[p].split == "train"]
            if train:
                part = block[train].astype(np.float64)
                total += part.sum(axis=(0, 2))
                total_sq += np.square(part).sum(axis=(0, 2))
                count += part.shape[0] * part.shape[2]
            data = block.tobytes()
            fh.write(data)
            digest.update(data)
        fh.flush()
        os.fsync(fh.fileno())
    stats = None
    if count:
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
        std = np.where(std > FLAT_STD, std, 1.0)
        stats = {"split": "train", "records": count // shape[2], "mean": mean.tolist(), "std": std.tolist()}
    return tmp, digest.hexdigest(), stats


# ----------------------------------------------------------------------------- reading

def read_manifest(path: str | Path) -> dict:
    """The manifest of cache folder ``path``; :class:`DataError` if it is not a complete cache."""
    path = Path(path).expanduser()
    manifest_path = path / "manifest.json"
    if not path.is_dir():
        raise DataError(f"cache {path} not found: create it with `ssl4ecg data prepare SOURCE PATH --out {path}`")
    if not manifest_path.is_file():
        hint = " (an unfinished prepare: run the same command again to resume it)" if (path / WORK).exists() else ""
        raise DataError(f"{path} is not a complete ssl4ecg cache: manifest.json is missing{hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{manifest_path} is unreadable ({exc}); prepare the cache again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{manifest_path} is not an ssl4ecg cache manifest (damaged or foreign); "
                        f"prepare the cache again")
    digest = manifest.get("manifest_sha256")
    if (digest is not None or "checks" in manifest) and digest != _manifest_digest(manifest):
        raise DataError(f"cache {path}: manifest.json is damaged (its content differs from its checksum); "
                        f"prepare the cache again with `ssl4ecg data prepare ... --out {path} --force`")
    version = manifest.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise DataError(f"{manifest_path} is damaged: format_version = {version!r}; prepare the cache again")
    if version > FORMAT_VERSION:
        raise DataError(f"cache {path} has format version {manifest['format_version']}; this ssl4ecg "
                        f"reads up to {FORMAT_VERSION}: upgrade ssl4ecg or prepare the cache again")
    return manifest


def _damaged(path: Path, name: str, why: str) -> DataError:
    return DataError(f"cache {path}: {name} {why}; prepare the cache again with `ssl4ecg data prepare ... "
                     f"--out {path} --force`")


def _expected_files(manifest: dict) -> list[str]:
    names = list(manifest.get("files", {}))
    if not names:  # a manifest without checksums: the files it implies
        names = ["signals.npy", "meta.npz"] + (["labels.npy"] if manifest.get("class_names") is not None else [])
    return names


def check_cache(path: str | Path, manifest: dict | None = None) -> dict:
    """The cheap integrity check every :func:`open_cache` runs; returns the manifest.

    Every file is present with the recorded size and sampled-page digest (caches prepared before
    the digests existed: presence only), ``signals.npy`` has a readable header matching the
    manifest, and a sample of its records is finite. A failure is one :class:`DataError`
    naming the file and saying to prepare the cache again.
    """
    path = Path(path).expanduser()
    manifest = read_manifest(path) if manifest is None else manifest
    checks = manifest.get("checks") or {}
    for name in _expected_files(manifest):
        file = path / name
        if not file.is_file():
            raise _damaged(path, name, "is missing")
        check = checks.get(name)
        if check is None:
            continue
        size = file.stat().st_size
        if size != check.get("size"):
            raise _damaged(path, name, f"is {size} bytes, the manifest recorded {check.get('size')} "
                                       f"(truncated or overwritten)")
        blocks, block = int(check.get("sample_blocks", SAMPLE_BLOCKS)), int(check.get("sample_block", SAMPLE_BLOCK))
        if _sample_sha256(file, size, blocks, block) != check.get("sample_sha256"):
            raise _damaged(path, name, "is damaged (its content differs from the checksum recorded at prepare time)")
    _signals(path, manifest, finite_sample=16)
    return manifest


def _signals(path: Path, manifest: dict, finite_sample: int = 0) -> np.ndarray:
    """``signals.npy`` memory-mapped, its shape and type checked; ``finite_sample`` records scanned."""
    try:
        signals = np.load(path / "signals.npy", mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise _damaged(path, "signals.npy", f"is unreadable ({exc})") from None
    dtype = manifest.get("dtype", "float32")
    if list(signals.shape) != list(manifest.get("shape", [])) or signals.dtype != np.dtype(dtype):
        raise _damaged(path, "signals.npy", f"holds {list(signals.shape)} {signals.dtype}, the manifest says "
                                            f"{manifest.get('shape')} {dtype}")
    if finite_sample and len(signals):
        rows = np.unique(np.linspace(0, len(signals) - 1, min(finite_sample, len(signals))).round().astype(int))
        if not np.isfinite(signals[rows]).all():
            raise _damaged(path, "signals.npy", "holds non-finite values (NaN or inf)")
    return signals


def open_cache(path: str | Path) -> tuple[RecordSet, dict]:
    """The cached records (signals memory-mapped, read-only) and the manifest.

    Runs :func:`check_cache` first: a missing, truncated or damaged file is a :class:`DataError`.
    ``signals`` has the cache's storage type (float16 for a float16 cache); the loaders and
    every conversion in :func:`ssl4ecg.data.build.adapt_cached` give float32.
    """
    path = Path(path).expanduser()
    manifest = check_cache(path)
    signals = _signals(path, manifest)
    n = len(signals)
    try:
        with np.load(path / "meta.npz") as meta:
            arrays = {k: meta[k] for k in meta.files}
    except Exception as exc:  # noqa: BLE001 - zip, pickle and format errors alike mean a damaged file
        raise _damaged(path, "meta.npz", f"is unreadable ({type(exc).__name__}: {exc})") from None
    for key in ("record_ids", "patient_ids", "splits"):
        if key not in arrays:
            raise _damaged(path, "meta.npz", f"has no {key!r} array")
    for key, arr in arrays.items():
        if arr.ndim != 1 or len(arr) != n:
            raise _damaged(path, "meta.npz", f"holds {key} of shape {list(arr.shape)} for {n} records")
    labels = None
    class_names = tuple(manifest.get("class_names") or ())
    if manifest.get("class_names") is not None:
        try:
            labels = np.load(path / "labels.npy")
        except Exception as exc:  # noqa: BLE001
            raise _damaged(path, "labels.npy", f"is unreadable ({type(exc).__name__}: {exc})") from None
        if labels.shape != (n, len(class_names)):
            raise _damaged(path, "labels.npy", f"holds {list(labels.shape)}, expected [{n}, {len(class_names)}] "
                                               f"({n} records, {len(class_names)} classes)")
    extra = {k[len("extra_"):]: v for k, v in arrays.items() if k.startswith("extra_")}
    try:
        records = RecordSet(
            signals=signals,
            leads=tuple(manifest["leads"]),
            sampling_rate=float(manifest["sampling_rate"]),
            record_ids=arrays["record_ids"],
            patient_ids=arrays["patient_ids"],
            splits=arrays["splits"],
            labels=labels,
            class_names=class_names,
            extra=extra,
            dropped=[(str(r), str(reason)) for r, reason in manifest.get("dropped", [])],
            integrity=dict(manifest.get("integrity", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(path, "manifest.json or meta.npz", f"does not describe the records ({exc})") from None
    return records, manifest


def count_nonfinite(path: str | Path, chunk: int = 256) -> int:
    """NaN and inf values in the cache's ``signals.npy`` (a full scan, chunk by chunk)."""
    path = Path(path).expanduser()
    signals = _signals(path, read_manifest(path))
    bad = 0
    for start in range(0, len(signals), chunk):
        bad += int(np.count_nonzero(~np.isfinite(signals[start:start + chunk])))
    return bad


def verify_cache(path: str | Path) -> list[str]:
    """Files of the cache that are missing or whose SHA-256 differs from the manifest, plus
    ``signals.npy`` if it holds NaN or inf (empty list = intact). Reads every byte."""
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    bad = []
    for name in _expected_files(manifest):
        digest = manifest.get("files", {}).get(name)
        if not (path / name).is_file() or (digest is not None and _sha256(path / name) != digest):
            bad.append(name)
    if "signals.npy" not in bad:
        try:
            if count_nonfinite(path):
                bad.append("signals.npy")
        except DataError:
            bad.append("signals.npy")
    return bad
