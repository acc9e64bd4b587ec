"""``ssl4ecg embed``: embeddings of every record of a cache, raw dataset or folder."""

from __future__ import annotations

import contextlib
import csv
import io
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
    so it is fed what it was trained on. Returns a short summary.
    """
    from ssl4ecg.data.build import load_records, resolve_data_section
    from ssl4ecg.registry import get_registry
    from ssl4ecg.train.device import select_device

    if out.suffix not in (".npz", ".npy"):
        raise ConfigError(f"--out {out}: use a .npz file (embeddings + record ids) or .npy (+ a .csv of ids beside it)")
    registry = get_registry()
    encoder, meta = load_encoder(encoder_path, registry)
    section = {**guess_source(Path(data)), **meta.get("preprocess", {})}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected key=value (a [data] key), e.g. --set task=rhythm")
        key, value = item.split("=", 1)
        section[key.removeprefix("data.")] = parse_value(value)
    section.setdefault("pretrain_splits", ["train", "val", "test"])
    records = load_records(resolve_data_section(section, registry), registry)
    dev = select_device(device)
    encoder = encoder.to(dev).eval()
    chunks = []
    starts = range(0, len(records), batch_size)
    bar = _bar(progress)
    with torch.no_grad(), (bar if bar is not None else contextlib.nullcontext()):
        task = bar.add_task("embedding", total=len(records)) if bar is not None else None
        for start in starts:
            index = np.arange(start, min(start + batch_size, len(records)))
            batch = records.to_batch(index)
            z = encoder.embed(batch.signal.to(dev), batch.leads)
            chunks.append(z.float().cpu().numpy())
            if bar is not None:
                bar.update(task, advance=len(index))
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, encoder.embed_dim), np.float32)
    ids = np.asarray(records.record_ids).astype(str)
    if out.suffix == ".npz":
        def write(f):
            buf = io.BytesIO()
            np.savez(buf, embeddings=embeddings, record_ids=ids, patient_ids=records.patient_ids,
                     splits=records.splits)
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
        writer.writerow(["row", "record_id", "patient_id", "split"])
        for i, (rid, pid, split) in enumerate(zip(ids, records.patient_ids, records.splits)):
            writer.writerow([i, rid, pid, split])
        atomic_write(out.with_suffix(".csv"), lambda f: f.write(text.getvalue().encode()))
    return {"records": len(ids), "dim": int(embeddings.shape[1]), "dropped": len(records.dropped), "out": str(out)}


def _bar(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
