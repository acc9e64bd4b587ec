"""From a recipe's ``[data]`` section to preprocessed records and training loaders.

The keys the framework understands are :data:`DATA_DEFAULTS`; every other key must be a
keyword argument of the chosen source's constructor (so the schema grows with the
sources plugins register). A source that takes a framework key (``path``, or
``sampling_rate`` / ``seconds`` for ``synthetic``) receives its value too.

* :func:`resolve_data_section` checks the section and completes it with defaults (and,
  when ``cache`` names a prepared cache, with that cache's source, options and
  preprocessing, so that only deliberate changes differ from it);
* :func:`load_records` returns the preprocessed :class:`~ssl4ecg.data.records.RecordSet`;
* :func:`load_mixture` / :func:`pretrain_loader` serve pretraining, on one dataset or on a
  weighted mixture of caches.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ssl4ecg.registry import check_type
from ssl4ecg.data.cache import (
    check_cache_dtype, open_cache, prepare_cache, read_in_memory, read_manifest,
)
from ssl4ecg.data.preprocess import (
    Preprocessing, apply_dataset_norm, bandpass, crop_offset, dataset_stats, fit_length,
    normalize_record, resample, select_leads,
)
from ssl4ecg.data.records import SPLITS, RecordSet
from ssl4ecg.errors import ConfigError, DataError, did_you_mean
from ssl4ecg.interfaces import JEPA_LEADS

log = logging.getLogger("ssl4ecg.data")

#: ``[data]`` keys of the framework itself, with their defaults (see docs/data/sources.md)
DATA_DEFAULTS: dict[str, Any] = {
    "source": "synthetic",  # registered source name (ptbxl, cinc, cpsc2018, code15, folder, ...)
    "path": "",  # dataset folder, for sources that read files
    "cache": "",  # a prepared cache folder; source and options then come from its manifest
    "cache_dir": "",  # prepare raw sources into a cache under this folder on first use
    "sampling_rate": 250.0,  # Hz, every record is resampled to it
    "seconds": 10.0,  # record length after cropping / padding
    "leads": list(JEPA_LEADS),  # leads in this order
    "derive_leads": True,  # compute III, aVR, aVL, aVF (I, II) from two limb leads when missing
    "bandpass": [],  # [] = off, or [low, high] Hz (zero-phase Butterworth, order 4)
    "normalize": "none",  # none | record | lead | dataset (train-split statistics)
    "crop": "start",  # window of longer records: start | center | random (train records only)
    "pad_short": False,  # zero-pad records shorter than `seconds` instead of dropping them
    "pretrain_splits": ["train", "val"],  # splits used for self-supervised pretraining
    "mixture": [],  # [{cache = "...", weight = 1.0}, ...]: pretrain on several caches
    "workers": 0,  # processes that prepare caches (0 = every core, at most 8)
    "cache_dtype": "float32",  # storage of prepared caches: float32 | float16 (half the size)
}
PREPROCESSING_KEYS = Preprocessing.FIELDS
#: ``[train]`` keys of the training loader, with their defaults (see :func:`loader_options`)
LOADER_DEFAULTS: dict[str, Any] = {
    "loader_workers": 0,  # processes building batches (0 = a background thread)
    "pin_memory": "auto",  # auto (on when training on CUDA) | on | off
}
PIN_MEMORY = ("auto", "on", "off")
MIXTURE_KEYS = {"cache": "", "weight": 1.0}
#: the ``source`` a resolved section with a ``mixture`` shows
MIXTURE_SOURCE = "mixture"


def _check_mixture(mixture: Any) -> list[dict]:
    if not isinstance(mixture, (list, tuple)):
        raise ConfigError("[data] mixture must be a list of tables {cache = \"...\", weight = 1.0}.")
    out = []
    for i, item in enumerate(mixture):
        if not isinstance(item, Mapping):
            raise ConfigError(f"[data] mixture entry {i + 1} must be a table {{cache = \"...\", weight = 1.0}}, "
                              f"got {item!r}.")
        for key in item:
            if key not in MIXTURE_KEYS:
                raise ConfigError(f"[data] mixture entry {i + 1}: unknown key '{key}'."
                                  f"{did_you_mean(key, MIXTURE_KEYS)}")
        if not item.get("cache"):
            raise ConfigError(f"[data] mixture entry {i + 1} needs cache = \"<prepared cache folder>\".")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ConfigError(f"[data] mixture entry {i + 1}: weight must be a number >= 0, got {weight!r}.")
        out.append({"cache": str(item["cache"]), "weight": float(weight)})
    if out and sum(e["weight"] for e in out) <= 0:
        raise ConfigError("[data] mixture weights sum to zero.")
    return out


def _lookup(registry, name: str, manifest: Mapping[str, Any] | None):
    """The registered source ``name``; for a cache, ``None`` when it is not installed here."""
    try:
        return registry.get("source", name)
    except ConfigError:
        if manifest is None:
            raise
        log.info("source '%s' of the cache is not installed; reading the cache only", name)
        return None


def _comparable(value: Any) -> Any:
    """Tuples and lists compare equal (a TOML list against a saved JSON list)."""
    return [_comparable(v) for v in value] if isinstance(value, (list, tuple)) else value


def resolve_data_section(section: Mapping[str, Any] | None, registry) -> dict:
    """Check a ``[data]`` section and complete it with every default (see module docstring).

    An unknown key raises :class:`ConfigError` naming it with the closest valid key. With
    ``cache``, unset keys take the cache's values (source, options, preprocessing).
    """
    raw = dict(section or {})
    mixture = _check_mixture(raw.get("mixture", []))
    cache = raw.get("cache", "") or ""
    if not isinstance(cache, str):
        raise ConfigError(f"[data] cache must be a folder path, got {cache!r}.")
    if cache and mixture:
        raise ConfigError("[data] cache and mixture exclude each other: list the cache in mixture instead.")
    manifest = read_manifest(cache) if cache else (read_manifest(mixture[0]["cache"]) if mixture else None)
    if cache:
        name = manifest["source"]
        if raw.get("source", name) != name:
            raise ConfigError(f"[data] source '{raw['source']}' contradicts cache {cache}, which holds "
                              f"'{name}' records; remove source or choose another cache.")
    elif mixture:
        name = MIXTURE_SOURCE
    else:
        name = raw.get("source", DATA_DEFAULTS["source"])
        if not isinstance(name, str):
            raise ConfigError(f"[data] source must be a name, got {name!r}.")
    # a mixture's records come from its caches: only framework keys apply
    component = None if mixture else _lookup(registry, name, manifest if cache else None)
    if component is not None:
        source_keys = component.options()
    else:  # a mixture, or a cache of a source that is not installed here: its manifest's options
        source_keys = {k: v for k, v in (manifest or {}).get("options", {}).items()} if cache else {}
    valid = set(DATA_DEFAULTS) | set(source_keys)
    for key in raw:
        if key not in valid:
            raise ConfigError(f"[data] unknown key '{key}' for source '{name}'.{did_you_mean(key, valid)}")
    for key, value in raw.items():
        if key in DATA_DEFAULTS and key != "mixture":
            check_type("data", key, value, DATA_DEFAULTS[key])

    resolved = copy.deepcopy(DATA_DEFAULTS)
    if manifest is not None:
        resolved.update(copy.deepcopy(manifest["preprocessing"]))
    if cache:
        resolved["source"] = name
        # storage only: batches are float32 whatever the cache holds, so the cache's type wins
        cached_dtype = manifest.get("dtype", "float32")
        if raw.get("cache_dtype", cached_dtype) != cached_dtype:
            log.info("[data] cache_dtype = %r is ignored: cache %s is stored as %s (read as float32)",
                     raw["cache_dtype"], cache, cached_dtype)
        raw["cache_dtype"] = cached_dtype
        cached_options = manifest.get("options", {})
        for key, value in cached_options.items():
            if key in source_keys or key == "path":
                resolved[key] = copy.deepcopy(value)
        for key, value in raw.items():
            # source options shaped the cached records and cannot be changed afterwards
            if key in source_keys and key not in DATA_DEFAULTS and key in cached_options \
                    and _comparable(value) != _comparable(cached_options[key]):
                raise ConfigError(
                    f"[data] {key} = {value!r} differs from cache {cache}, prepared with "
                    f"{key} = {cached_options[key]!r}; remove the key or prepare another cache.")
    elif component is not None:
        for key, value in source_keys.items():
            if key not in DATA_DEFAULTS and value is not inspect.Parameter.empty and value is not None:
                resolved[key] = list(value) if isinstance(value, tuple) else copy.deepcopy(value)
    resolved.update(copy.deepcopy(raw))
    resolved["mixture"] = mixture
    resolved["source"] = name

    pp = Preprocessing.from_section(resolved)
    resolved.update(pp.as_dict())
    splits = resolved["pretrain_splits"]
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ConfigError(f"[data] pretrain_splits must list some of {', '.join(SPLITS)}, got {list(splits)}.")
    resolved["pretrain_splits"] = list(splits)
    check_cache_dtype(resolved["cache_dtype"])
    if resolved["workers"] < 0:
        raise ConfigError(f"[data] workers must be >= 0 (0 = every core), got {resolved['workers']}.")
    if not mixture and not cache and resolved["path"] and "path" not in source_keys:
        raise ConfigError(f"[data] source '{name}' reads no files and takes no path; remove [data] path.")
    return resolved


def source_options(resolved: Mapping[str, Any], registry) -> dict:
    """The keyword arguments the resolved section passes to its source's constructor."""
    keys = registry.get("source", resolved["source"]).options()
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in resolved.items() if k in keys}


def make_source(resolved: Mapping[str, Any], registry):
    """Build the resolved section's source through the registry."""
    return registry.build("source", resolved["source"], source_options(resolved, registry), section="data")


def prepare(resolved: Mapping[str, Any], registry, out: str | Path, *, workers: int | None = None,
            progress: bool = False, force: bool = False) -> dict:
    """Prepare the resolved section's source into cache folder ``out``; return the manifest."""
    pp = Preprocessing.from_section(resolved)
    source = make_source(resolved, registry)
    return prepare_cache(source, resolved["source"], source_options(resolved, registry), pp, out,
                         workers=resolved.get("workers", 0) if workers is None else workers,
                         progress=progress, force=force, dtype=resolved.get("cache_dtype", "float32"))


def auto_cache_path(resolved: Mapping[str, Any], registry) -> Path:
    """Folder under ``cache_dir`` for the resolved section (keyed by source, options, preprocessing)."""
    key = {"source": resolved["source"], "options": source_options(resolved, registry),
           "preprocessing": Preprocessing.from_section(resolved).as_dict()}
    if resolved.get("cache_dtype", "float32") != "float32":  # float32 keeps the folders made before the key
        key["dtype"] = resolved["cache_dtype"]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(resolved["cache_dir"]).expanduser() / f"{resolved['source']}-{digest}"


def load_records(section: Mapping[str, Any], registry) -> RecordSet:
    """The preprocessed records of a ``[data]`` section: ``[N, leads, T]`` float32 at ``sampling_rate``.

    Reads the named cache (memory-mapped; no raw file is opened), or the raw source
    (through an automatic cache under ``cache_dir`` when set). Records that cannot be
    used are listed with their reasons in ``RecordSet.dropped``.
    """
    resolved = resolve_data_section(section, registry)
    pp = Preprocessing.from_section(resolved)
    if resolved["mixture"]:
        raise ConfigError("[data] mixture names several caches: load them with "
                          "ssl4ecg.data.build.load_mixture or pretrain_loader.")
    stats = None
    if resolved["cache"]:
        records, manifest = open_cache(resolved["cache"])
        records, converted = adapt_cached(records, manifest, pp, resolved["cache"])
        stats = None if converted else manifest.get("dataset_stats")
    elif resolved["cache_dir"]:
        path = auto_cache_path(resolved, registry)
        if not (path / "manifest.json").exists():
            log.info("preparing %s into %s", resolved["source"], path)
            prepare(resolved, registry, path, progress=sys.stderr.isatty())
        records, manifest = open_cache(path)
        stats = manifest.get("dataset_stats")
    else:
        records = read_in_memory(make_source(resolved, registry), resolved["source"], pp)
    if pp.normalize == "dataset":
        records = normalize_dataset(records, stats)
    return records


def normalize_dataset(records: RecordSet, stats: Mapping[str, Any] | None = None) -> RecordSet:
    """Per-lead z-scoring with the train split's statistics (computed unless ``stats`` given)."""
    if stats:
        mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
    else:
        mean, std = dataset_stats(records.signals, np.flatnonzero(records.splits == "train"))
    from dataclasses import replace

    return replace(records, signals=apply_dataset_norm(records.signals, mean, std))


def adapt_cached(records: RecordSet, manifest: Mapping[str, Any], pp: Preprocessing,
                 where: str = "cache") -> tuple[RecordSet, bool]:
    """Bring cached records to the preprocessing ``pp`` asks for; ``(records, converted)``.

    Identical settings return the memory map untouched. Otherwise, in memory and with a
    logged note: other leads are selected or derived, the rate is resampled, a band-pass
    is applied if the cache has none, records are cut shorter, and per-record
    normalisation is applied if the cache has none. Anything else (longer records, a
    different band-pass or normalisation already baked in) is a :class:`ConfigError`.
    """
    from dataclasses import replace

    cached = Preprocessing.from_section(manifest["preprocessing"])
    changes = []
    sig = records.signals

    def fail(what: str) -> ConfigError:
        return ConfigError(f"cache {where} {what}; prepare a cache with the wanted [data] settings "
                           f"(`ssl4ecg data prepare ... --set key=value`).")

    if pp.leads != cached.leads:
        try:
            sig = select_leads(sig, cached.leads, pp.leads, derive=pp.derive_leads)
        except DataError as exc:
            raise fail(f"holds leads {list(cached.leads)}: {exc}") from None
        changes.append(f"leads {list(cached.leads)} -> {list(pp.leads)}")
    if pp.sampling_rate != cached.sampling_rate:
        sig = _chunked(sig, lambda x: resample(x, cached.sampling_rate, pp.sampling_rate))
        changes.append(f"resampled {cached.sampling_rate:g} -> {pp.sampling_rate:g} Hz")
    if pp.bandpass != cached.bandpass:
        if cached.bandpass:
            raise fail(f"was band-passed {list(cached.bandpass)} Hz, [data] asks {list(pp.bandpass) or 'none'}")
        sig = _chunked(sig, lambda x: bandpass(x, pp.sampling_rate, *pp.bandpass))
        changes.append(f"band-pass {list(pp.bandpass)} Hz")
    n = pp.n_samples
    if sig.shape[-1] > n and pp.seconds < cached.seconds:
        starts = [crop_offset(sig.shape[-1], n, pp.crop, rid, split)
                  for rid, split in zip(records.record_ids, records.splits)]
        if len(set(starts)) == 1:
            sig = sig[..., starts[0]:starts[0] + n]
        else:
            sig = np.stack([sig[i, :, s:s + n] for i, s in enumerate(starts)])
        changes.append(f"cut to {pp.seconds:g} s")
    elif pp.seconds > cached.seconds:
        raise fail(f"holds {cached.seconds:g} s records and [data] seconds asks {pp.seconds:g}")
    if sig.shape[-1] != n:  # off-by-one lengths after resampling
        sig = _chunked(sig, lambda x: fit_length(x[..., :n], n, pad_short=True))
    if pp.record_normalize != cached.record_normalize:
        if cached.record_normalize != "none":
            raise fail(f"was normalised per {cached.record_normalize}, [data] asks {pp.normalize}")
        sig = _chunked(sig, lambda x: normalize_record(x, pp.record_normalize))
        changes.append(f"normalised per {pp.record_normalize}")
    if not changes and sig is records.signals:
        return records, False
    log.warning("cache %s converted in memory (%s); prepare a cache with these settings to memory-map it",
                where, "; ".join(changes) or "length")
    sig = np.ascontiguousarray(sig, dtype=np.float32)
    return replace(records, signals=sig, leads=pp.leads, sampling_rate=pp.sampling_rate), True


def _chunked(signals: np.ndarray, fn, chunk: int = 256) -> np.ndarray:
    """``fn`` applied to blocks of records (bounded temporary memory)."""
    parts = [fn(np.asarray(signals[i:i + chunk], dtype=np.float32)) for i in range(0, len(signals), chunk)]
    return np.concatenate(parts) if parts else np.asarray(signals, dtype=np.float32)


def load_mixture(section: Mapping[str, Any], registry) -> list[tuple[RecordSet, float]]:
    """The caches of ``[data] mixture`` with their weights, all brought to the same preprocessing."""
    resolved = resolve_data_section(section, registry)
    if not resolved["mixture"]:
        raise ConfigError("[data] mixture is empty: list caches as mixture = [{cache = \"...\", weight = 1.0}].")
    pp = Preprocessing.from_section(resolved)
    parts = []
    for item in resolved["mixture"]:
        records, manifest = open_cache(item["cache"])
        records, converted = adapt_cached(records, manifest, pp, item["cache"])
        if pp.normalize == "dataset":
            records = normalize_dataset(records, None if converted else manifest.get("dataset_stats"))
        parts.append((records, item["weight"]))
    return parts


def loader_options(train: Mapping[str, Any], device: Any = "cpu") -> dict:
    """``workers`` and ``pin_memory`` of the training loader from ``[train]`` (:data:`LOADER_DEFAULTS`).

    ``pin_memory = "auto"`` pins batches when ``device`` is a CUDA device (page-locked
    batches let ``batch.to(device, non_blocking=True)`` overlap the copy with compute).
    """
    import torch

    workers = train.get("loader_workers", LOADER_DEFAULTS["loader_workers"])
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"[train] loader_workers = {workers!r} is invalid: it must be an integer >= 0 "
                          f"(processes building batches; 0 = a background thread).")
    pin = train.get("pin_memory", LOADER_DEFAULTS["pin_memory"])
    if pin not in PIN_MEMORY:
        raise ConfigError(f"[train] pin_memory = {pin!r} is invalid: it must be one of "
                          f"{', '.join(repr(p) for p in PIN_MEMORY)} (auto = on when training on CUDA).")
    on_cuda = torch.device(device).type == "cuda"
    return {"workers": workers, "pin_memory": on_cuda if pin == "auto" else pin == "on"}


def pretrain_loader(section: Mapping[str, Any], registry, batch_size: int, *, seed: int = 0,
                    rank: int = 0, world_size: int = 1, crop_samples: int | None = None,
                    prefetch: int = 2, drop_last: bool = True, workers: int = 0,
                    pin_memory: bool = False):
    """The training loader of a ``[data]`` section over its ``pretrain_splits``.

    A :class:`~ssl4ecg.data.loader.MixtureLoader` when ``mixture`` is set, else a
    :class:`~ssl4ecg.data.loader.BatchLoader`; memory-mapped caches are never copied.
    ``loader.spec`` gives the signal geometry to build the encoder for. ``workers`` processes
    build the batches (0 = a background thread); ``pin_memory`` pages them in locked memory
    when CUDA is available (:func:`loader_options` reads both from ``[train]``).
    """
    from ssl4ecg.data.loader import BatchLoader, MixtureLoader

    resolved = resolve_data_section(section, registry)
    splits = resolved["pretrain_splits"]
    common = dict(seed=seed, rank=rank, world_size=world_size, crop_samples=crop_samples,
                  prefetch=prefetch, drop_last=drop_last, workers=workers, pin_memory=pin_memory)
    if resolved["mixture"]:
        parts = load_mixture(resolved, registry)
        indices = [np.flatnonzero(np.isin(rs.splits, splits)) for rs, _ in parts]
        for item, ix in zip(resolved["mixture"], indices):
            if len(ix) == 0:
                raise ConfigError(f"mixture cache {item['cache']} has no record in pretrain_splits {splits}.")
        return MixtureLoader([rs for rs, _ in parts], [w for _, w in parts], batch_size,
                             indices=indices, **common)
    records = load_records(resolved, registry)
    index = np.flatnonzero(np.isin(records.splits, splits))
    if len(index) == 0:
        raise ConfigError(f"[data] no record is in pretrain_splits {splits} "
                          f"(splits present: {sorted(set(records.splits.tolist()))}).")
    return BatchLoader(records, batch_size, indices=index, **common)
