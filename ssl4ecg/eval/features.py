"""Frozen-feature extraction: pooled embeddings of every record, batched, without gradients."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch

from ssl4ecg.errors import ConfigError, DataError
from ssl4ecg.interfaces import EvalContext, Encoder


def lead_rows(records, leads: Sequence[str] | None) -> tuple[list[int], tuple[str, ...]]:
    """Row indices of ``leads`` in ``records.leads`` and the lead names (all leads when ``None``)."""
    available = tuple(records.leads)
    if leads is None:
        return list(range(len(available))), available
    leads = tuple(leads)
    missing = [lead for lead in leads if lead not in available]
    if missing:
        raise ConfigError(
            f"leads {missing} are not in the data, which has {list(available)}; "
            f"choose leads from those (check the evaluator's lead options and [data] leads)."
        )
    return [available.index(lead) for lead in leads], leads


def encoder_leads(encoder: Encoder, leads: tuple[str, ...]) -> tuple[str, ...] | None:
    """The ``leads`` argument for ``encoder.embed``: ``None`` when they are the encoder's own leads."""
    spec = getattr(encoder, "spec", None)
    if spec is not None and tuple(spec.leads) == tuple(leads):
        return None
    return leads


def autocast(context: EvalContext) -> contextlib.AbstractContextManager:
    """bf16 autocast on the context's device when ``context.precision == "bf16"``, else nothing."""
    if context.precision == "bf16":
        device_type = torch.device(context.device).type
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    if context.precision not in ("fp32", "32", "float32"):
        raise ConfigError(f"unknown precision '{context.precision}'; use 'fp32' or 'bf16'.")
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode and restore every submodule's own training flag afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def iter_signal_batches(records, rows: list[int], batch_size: int, index: np.ndarray | None = None):
    """Yield float32 tensors ``[B, len(rows), T]`` of the records at ``index`` (all when ``None``)."""
    n = len(records) if index is None else len(index)
    all_rows = rows == list(range(len(records.leads)))
    for start in range(0, n, batch_size):
        sel = np.arange(start, min(n, start + batch_size))
        if index is not None:
            sel = index[sel]
        x = np.asarray(records.signals[sel], dtype=np.float32)
        if not all_rows:
            x = x[:, rows]
        yield torch.from_numpy(np.ascontiguousarray(x))


def extract_features(
    encoder: Encoder, records, context: EvalContext, leads: Sequence[str] | None = None
) -> np.ndarray:
    """Pooled embeddings ``[N, embed_dim]`` (float32) of every record of ``records``.

    Runs ``encoder.embed`` in eval mode without gradients, ``context.batch_size`` records at a
    time on ``context.device`` (bf16 autocast when ``context.precision == "bf16"``), and restores
    the encoder's training flags afterwards. ``leads`` selects rows of the signal by name (the
    encoder receives them with ``leads=...``); ``None`` feeds every lead of the data.
    """
    if not isinstance(records.signals, np.ndarray):
        raise ConfigError("records are ragged (different lengths); preprocess them before evaluation.")
    if context.batch_size < 1:
        raise ConfigError(f"eval batch_size must be >= 1, got {context.batch_size}.")
    rows, names = lead_rows(records, leads)
    enc_leads = encoder_leads(encoder, names)
    device = torch.device(context.device)
    out: list[np.ndarray] = []
    with eval_mode(encoder), torch.no_grad():
        for x in iter_signal_batches(records, rows, context.batch_size):
            with autocast(context):
                z = encoder.embed(x.to(device), leads=enc_leads)
            if z.ndim != 2 or z.shape[0] != x.shape[0]:
                raise ConfigError(
                    f"encoder {type(encoder).__name__}.embed returned shape {tuple(z.shape)}; "
                    f"expected [batch, embed_dim]."
                )
            out.append(z.float().cpu().numpy())
    if not out:
        dim = int(getattr(encoder, "embed_dim", 0))
        return np.zeros((0, dim), dtype=np.float32)
    features = np.concatenate(out).astype(np.float32, copy=False)
    check_finite_features(features, records)
    return features


def check_finite_features(features: np.ndarray, records) -> None:
    """Refuse non-finite features, naming the records and whether their signals or the encoder are at fault."""
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if not len(bad):
        return
    ids = [str(records.record_ids[i]) for i in bad[:5]]
    damaged = [i for i in bad if not np.isfinite(np.asarray(records.signals[i], dtype=np.float32)).all()]
    if damaged:
        raise DataError(
            f"{len(damaged)} record(s) hold NaN/inf signal values (e.g. {', '.join(ids)}), so their features "
            "are not finite. The data is damaged: check the cache with `ssl4ecg data info CACHE --verify` "
            "and prepare it again with --force.")
    raise DataError(
        f"the encoder gives non-finite features for {len(bad)} record(s) with finite signals (e.g. "
        f"{', '.join(ids)}): its weights are damaged or it overflows; check the encoder file or evaluate in fp32.")
