"""Saved encoders: the weights plus everything needed to rebuild and feed them.

An encoder file (``encoder.pt`` in a run directory, or what ``ssl4ecg import`` writes)
holds the registered component name and options, the :class:`SignalSpec` it was built
for, the preprocessing it expects (sampling rate, leads, normalisation, ...) and the
state dict. :func:`load_encoder` accepts such a file or a run directory.

The file holds tensors and plain values only and is read with ``weights_only=True``
(:mod:`ssl4ecg.safeload`): opening an encoder shared by someone else runs no code.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from ssl4ecg.errors import CheckpointError
from ssl4ecg.interfaces import Encoder, SignalSpec
from ssl4ecg.io import atomic_write
from ssl4ecg.safeload import UnsafeFileError, safe_load, to_plain

FORMAT = "ssl4ecg-encoder-v1"
#: [data] keys an encoder's input depends on; saved with it so evaluation feeds it the same
PREPROCESS_KEYS = ("sampling_rate", "seconds", "leads", "derive_leads", "bandpass", "normalize", "crop")


def save_encoder(path: str | Path, encoder: Encoder, component: str, options: dict[str, Any],
                 preprocess: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write ``encoder`` with its recipe options and expected preprocessing (atomically)."""
    spec = encoder.spec
    payload = {
        "format": FORMAT,
        "component": component,
        "options": dict(options),
        "spec": {"leads": list(spec.leads), "sampling_rate": spec.sampling_rate, "n_samples": spec.n_samples},
        "preprocess": {k: preprocess[k] for k in PREPROCESS_KEYS if k in preprocess},
        "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
        **(extra or {}),
    }
    buffer = io.BytesIO()
    torch.save(to_plain(payload), buffer)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def load_encoder(path: str | Path, registry=None) -> tuple[Encoder, dict[str, Any]]:
    """Rebuild the encoder saved at ``path`` (a file or a run directory); returns (encoder, metadata)."""
    from ssl4ecg.registry import get_registry

    path = Path(path)
    if path.is_dir():
        candidate = path / "encoder.pt"
        if not candidate.exists():
            raise CheckpointError(f"{path} holds no encoder.pt; is it a finished ssl4ecg run directory?")
        path = candidate
    if not path.exists():
        raise CheckpointError(f"encoder file not found: {path}")
    try:
        payload = safe_load(path, "encoder file", "re-create it with `ssl4ecg run` or `ssl4ecg import` "
                                                  "from a checkpoint you trust.")
    except UnsafeFileError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path} is not a readable encoder file ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an ssl4ecg encoder file; reference ECG-JEPA checkpoints are converted "
            "with `ssl4ecg import ecg-jepa CHECKPOINT --out FILE` first")
    registry = registry or get_registry()
    try:
        spec = SignalSpec(tuple(payload["spec"]["leads"]), float(payload["spec"]["sampling_rate"]),
                          int(payload["spec"]["n_samples"]))
        component, options = str(payload["component"]), dict(payload["options"])
        if not isinstance(payload["state_dict"], dict):
            raise TypeError("state_dict is not a table")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is a damaged ssl4ecg encoder file ({type(exc).__name__}: {exc}); "
                              "re-create it with `ssl4ecg run` or `ssl4ecg import`") from None
    from ssl4ecg.limits import check_model_size

    check_model_size(lambda: registry.build("encoder", component, options, section="encoder", spec=spec),
                     f"{path}: encoder '{component}' {options}", torch.device("cpu"), training=False)
    encoder = registry.build("encoder", component, options, section="encoder", spec=spec)
    try:
        missing, unexpected = encoder.load_state_dict(payload["state_dict"], strict=False)
    except RuntimeError as exc:  # shapes that do not fit
        raise CheckpointError(f"{path}: weights do not fit encoder '{component}' {options}: "
                              f"{str(exc).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit encoder '{component}' "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    encoder.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return encoder, meta
