"""``ssl4ecg embed``: embeddings of every record of a cache, raw dataset or folder."""

from __future__ import annotations

import contextlib
import csv
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl4ecg.artifacts import load_encoder
from ssl4ecg.errors import ConfigError, DataError
from ssl4ecg.io import atomic_write
from ssl4ecg.recipe import parse_value


def guess_source(path: Path) -> dict[str, Any]:
    """The [data] keys that read ``path``: a prepared cache, a PTB-XL release, CinC records or a folder."""
    if not path.exists():
        raise DataError(f"{path} does not exist; give a prepared cache, a dataset folder or a folder of WFDB records")
    if (path / "manifest.json").exists():
        return {"cache": str(path)}
    if (path / "ptbxl_database.csv").exists():
        return {"source": "ptbxl", "path": str(path)}
    if (path / "exams.csv").exists():
        return {"source": "code15", "path": str(path)}
    if (path / "REFERENCE.csv").exists():
        return {"source": "cpsc2018", "path": str(path)}
    if any(path.rglob("*.hea")) and any(path.rglob("*.mat")):
        return {"source": "cinc", "path": str(path)}
    if any(path.rglob("*.hea")):
        return {"source": "folder", "path": str(path)}
    if any(path.rglob("*.mat")):
        return {"source": "cpsc2018", "path": str(path)}
    raise DataError(f"{path}: found no cache manifest, PTB-XL database, CODE-15 exams.csv or WFDB/.mat records")


def embed_records(encoder_path: Path, data: Path, out: Path, overrides: list[str] = (),
                  batch_size: int = 64, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Embed every record at ``data`` with the saved encoder and write ``out`` (.npz or .npy + .csv).

    The encoder's own preprocessing (sampling rate, seconds, leads, normalisation) is applied,
    so it is fed what it was trained on. Every readable record is embedded, labelled or not
    (see :func:`keep_unlabelled`); labels are written where they exist, and records that could
    not be used are listed with their reasons in ``<out stem>.dropped.csv``. Returns a short summary.
    """
    from ssl4ecg.data.build import load_records, resolve_data_section
    from ssl4ecg.data.sources.cpsc2018 import CPSC2018Warning
    from ssl4ecg.registry import get_registry
    from ssl4ecg.train.device import select_device

    if out.suffix not in (".npz", ".npy"):
        raise ConfigError(f"--out {out}: use a .npz file (embeddings + record ids) or .npy (+ a .csv of ids beside it)")
    registry = get_registry()
    encoder, meta = load_encoder(encoder_path, registry)
    section = {**guess_source(Path(data)), **meta.get("preprocess", {})}
    given = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected key=value (a [data] key), e.g. --set task=rhythm")
        key, value = item.split("=", 1)
        key = key.strip().removeprefix("data.")
        section[key] = parse_value(value.strip())
        given.add(key)
    section.setdefault("pretrain_splits", ["train", "val", "test"])
    keep_unlabelled(section, given, registry)
    with warnings.catch_warnings():
        # embedding needs no labels: a CPSC2018 folder without REFERENCE.csv is expected here
        # (the source still prints its note saying the records are read without labels)
        warnings.filterwarnings("ignore", category=CPSC2018Warning)
        records = load_records(resolve_data_section(section, registry), registry)
    dev = select_device(device)
    encoder = encoder.to(dev).eval()
    chunks = []
    starts = range(0, len(records), batch_size)
    bar = _bar(progress)
    with torch.no_grad(), (bar if bar is not None else contextlib.nullcontext()):
        task = bar.add_task("embedding", total=len(records)) if bar is not None else None
        for start in starts:
            # a copy: a cache's memory map is read-only, and torch.from_numpy warns on it
            signal = torch.from_numpy(np.array(records.signals[start:start + batch_size], dtype=np.float32))
            z = encoder.embed(signal.to(dev), tuple(records.leads))
            chunks.append(z.float().cpu().numpy())
            if bar is not None:
                bar.update(task, advance=len(signal))
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, encoder.embed_dim), np.float32)
    ids = np.asarray(records.record_ids).astype(str)
    labelled = records.labels is not None and len(records.class_names) > 0
    if out.suffix == ".npz":
        def write(f):
            buf = io.BytesIO()
            arrays = dict(embeddings=embeddings, record_ids=ids, patient_ids=records.patient_ids,
                          splits=records.splits)
            if labelled:  # multi-hot [N, C]; an all-zero row is a record without a class of the map
                arrays.update(labels=np.asarray(records.labels, dtype=np.float32),
                              class_names=np.asarray(records.class_names, dtype=str))
            np.savez(buf, **arrays)
            f.write(buf.getvalue())
        atomic_write(out, write)
    else:
        def write_npy(f):
            buf = io.BytesIO()
            np.save(buf, embeddings)
            f.write(buf.getvalue())
        atomic_write(out, write_npy)
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["row", "record_id", "patient_id", "split"] + (["labels"] if labelled else []))
        for i, (rid, pid, split) in enumerate(zip(ids, records.patient_ids, records.splits)):
            row = [i, rid, pid, split]
            if labelled:  # class names joined by ';' (empty: no class of the label map)
                row.append(";".join(n for n, v in zip(records.class_names, records.labels[i]) if v > 0.5))
            writer.writerow(row)
        atomic_write(out.with_suffix(".csv"), lambda f: f.write(text.getvalue().encode()))
    dropped_file = write_dropped(out, records.dropped)
    return {"records": len(ids), "dim": int(embeddings.shape[1]), "dropped": len(records.dropped),
            "dropped_file": str(dropped_file) if dropped_file else "",
            "dropped_examples": [f"{rid}: {reason}" for rid, reason in records.dropped[:3]],
            "out": str(out)}


def keep_unlabelled(section: dict[str, Any], given: set[str], registry) -> None:
    """Embedding needs no labels: a raw source that can keep unlabelled records keeps them.

    Sources with a ``keep_unlabelled`` option (CinC challenge records whose diagnoses lie
    outside the label map) get ``keep_unlabelled = true`` unless ``--set`` chose it; labels
    stay where the map has them. A prepared cache holds what it was prepared with.
    """
    if section.get("cache") or "keep_unlabelled" in given or "source" not in section:
        return
    try:
        options = registry.get("source", section["source"]).options()
    except ConfigError:
        return  # an unknown source is reported by resolve_data_section with its alternatives
    if "keep_unlabelled" in options:
        section["keep_unlabelled"] = True


def dropped_path(out: Path) -> Path:
    """``<out stem>.dropped.csv`` beside the embeddings: the records left out, with reasons."""
    return out.with_name(out.stem + ".dropped.csv")


def write_dropped(out: Path, dropped: list[tuple[str, str]]) -> Path | None:
    """Write the dropped records (record id, reason) beside ``out``; ``None`` when none was dropped.

    A list left from an earlier run into the same ``out`` is replaced by an empty one, so the
    file never describes other embeddings.
    """
    path = dropped_path(out)
    if not dropped and not path.exists():
        return None
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["record_id", "reason"])
    for rid, reason in dropped:
        writer.writerow([rid, reason])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))
    return path if dropped else None


def _bar(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
