"""Import weights saved by the public ECG-JEPA reference code (Kim 2024) into ssl4ecg modules.

Reference encoder keys (``MaskTransformer.state_dict()``, stored as ``ckpt['encoder']`` in the
released checkpoints) map onto :class:`CroPAViT` by renaming only::

    W_P.*                         -> patch_embed.*
    encoder_blocks.blocks.<i>.*   -> blocks.<i>.*   (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)
    norm.*                        -> norm.*
    pos_embed                     -> checked against our fixed 2-D sin-cos table, not loaded

Reference predictor keys (``MaskTransformerPredictor``) map onto :class:`JEPAPredictor`::

    predictor_embed.* -> embed.*, mask_token -> mask_token, predictor_blocks.blocks.<i>.* -> blocks.<i>.*,
    predictor_norm.* -> norm.*, predictor_proj.* -> proj.*, pos_embed -> checked, not loaded

Widths, depths, patch size, MLP ratio and qkv bias are read from the tensors; the number of
heads cannot be, so it is an argument (released encoder: 16; predictor: 12).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ssl4ecg.errors import CheckpointError
from ssl4ecg.interfaces import JEPA_LEADS, SignalSpec

from ssl4ecg_jepa.encoder import CroPAViT
from ssl4ecg_jepa.predictor import JEPAPredictor

_ENCODER_RENAMES = (("W_P.", "patch_embed."), ("encoder_blocks.blocks.", "blocks."), ("norm.", "norm."))
_PREDICTOR_RENAMES = (
    ("predictor_embed.", "embed."),
    ("predictor_blocks.blocks.", "blocks."),
    ("predictor_norm.", "norm."),
    ("predictor_proj.", "proj."),
    ("mask_token", "mask_token"),
)
_POS_TOLERANCE = 1e-4


def encoder_from_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    heads: int = 16,
    sampling_rate: float = 250.0,
    leads: Sequence[str] = JEPA_LEADS,
    source: str = "state_dict",
) -> CroPAViT:
    """A :class:`CroPAViT` (eval mode, drop-path 0) holding a reference encoder's weights.

    ``leads`` names the reference's lead rows in order (default I, II, V1-V6 at 250 Hz);
    ``source`` names the file in error messages.
    """
    _require(state_dict, ("W_P.weight", "pos_embed", "norm.weight"), source, "encoder")
    dim, patch_size = state_dict["W_P.weight"].shape
    depth = _count_blocks(state_dict, "encoder_blocks.blocks.")
    n_tokens = state_dict["pos_embed"].shape[0]
    if depth == 0 or n_tokens % len(leads) != 0:
        raise CheckpointError(
            f"{source}: cannot read the encoder geometry (depth {depth}, {n_tokens} positions for "
            f"{len(leads)} leads); is this an ECG-JEPA encoder state_dict with leads {list(leads)}?"
        )
    n_slots = n_tokens // len(leads)
    hidden = state_dict["encoder_blocks.blocks.0.mlp.fc1.weight"].shape[0] if (
        "encoder_blocks.blocks.0.mlp.fc1.weight" in state_dict) else 4 * dim
    spec = SignalSpec(leads=tuple(leads), sampling_rate=float(sampling_rate), n_samples=n_slots * patch_size)
    encoder = CroPAViT(
        spec,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_ratio=hidden / dim,
        patch_size=patch_size,
        qkv_bias="encoder_blocks.blocks.0.attn.qkv.bias" in state_dict,
        drop_path=0.0,
        cropa=True,
        pos_every_block=True,
    )
    _check_pos(state_dict["pos_embed"], encoder.pos_embed.reshape(n_tokens, dim), source, "encoder")
    _load(encoder, _rename(state_dict, _ENCODER_RENAMES, {"pos_embed"}, source, "encoder"), source, "encoder")
    return encoder.eval()


def predictor_from_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor], heads: int = 12, source: str = "state_dict"
) -> JEPAPredictor:
    """A :class:`JEPAPredictor` (eval mode, drop-path 0) holding a reference predictor's weights."""
    _require(state_dict, ("predictor_embed.weight", "pos_embed", "predictor_proj.weight"), source, "predictor")
    dim, embed_dim = state_dict["predictor_embed.weight"].shape
    depth = _count_blocks(state_dict, "predictor_blocks.blocks.")
    hidden_key = "predictor_blocks.blocks.0.mlp.fc1.weight"
    hidden = state_dict[hidden_key].shape[0] if hidden_key in state_dict else 4 * dim
    predictor = JEPAPredictor(
        embed_dim=embed_dim,
        n_slots=state_dict["pos_embed"].shape[0],
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_ratio=hidden / dim,
        qkv_bias="predictor_blocks.blocks.0.attn.qkv.bias" in state_dict,
        drop_path=0.0,
    )
    _check_pos(state_dict["pos_embed"], predictor.pos_embed, source, "predictor")
    _load(predictor, _rename(state_dict, _PREDICTOR_RENAMES, {"pos_embed"}, source, "predictor"), source, "predictor")
    return predictor.eval()


def import_reference_checkpoint(
    path: str | Path,
    heads: int = 16,
    sampling_rate: float = 250.0,
    leads: Sequence[str] = JEPA_LEADS,
) -> tuple[CroPAViT, dict[str, Any]]:
    """Read a released ECG-JEPA checkpoint ``{'encoder': state_dict, 'epoch': ...}``.

    Returns the encoder (eval mode) and metadata: the file's other scalar entries (e.g.
    ``epoch``) plus ``source``, ``format`` and the inferred geometry.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling/format errors of a foreign file
        raise CheckpointError(
            f"{path}: cannot read it as a weights-only torch checkpoint ({type(exc).__name__}: {exc})."
        ) from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("encoder"), Mapping):
        keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path}: expected an ECG-JEPA checkpoint {{'encoder': state_dict, ...}}, found {keys}."
        )
    encoder = encoder_from_reference_state_dict(
        checkpoint["encoder"], heads=heads, sampling_rate=sampling_rate, leads=leads, source=str(path)
    )
    metadata: dict[str, Any] = {
        k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v)
        for k, v in checkpoint.items()
        if k != "encoder" and isinstance(v, (int, float, str, bool, torch.Tensor)) and
        (not isinstance(v, torch.Tensor) or v.numel() == 1)
    }
    metadata.update(
        source=str(path),
        format="ecg-jepa-reference",
        dim=encoder.embed_dim,
        depth=encoder.depth,
        heads=encoder.heads,
        patch_size=encoder.patch_size,
        leads=list(encoder.spec.leads),
        sampling_rate=encoder.spec.sampling_rate,
        n_samples=encoder.spec.n_samples,
    )
    return encoder, metadata



def ecg_jepa_importer(
    path: str | Path,
    heads: int = 16,
    sampling_rate: float = 250.0,
    leads: Sequence[str] = JEPA_LEADS,
    normalize: str = "none",
) -> dict[str, Any]:
    """The ``ecg-jepa`` importer behind ``ssl4ecg import ecg-jepa CHECKPOINT --out FILE``.

    Returns what :func:`ssl4ecg.artifacts.save_encoder` needs: the encoder, its registered
    component name and options (so it can be rebuilt), and the preprocessing the weights
    expect (the released model: 250 Hz, 10 s, leads I, II, V1-V6, no normalisation or filter).
    """
    encoder, metadata = import_reference_checkpoint(path, heads=heads, sampling_rate=sampling_rate, leads=leads)
    options = {
        "dim": encoder.dim, "depth": encoder.depth, "heads": encoder.heads,
        "patch_size": encoder.patch_size, "mlp_ratio": encoder.mlp_ratio, "qkv_bias": encoder.qkv_bias,
        "drop_path": 0.0, "cropa": True, "pos_every_block": True,
    }
    preprocess = {
        "sampling_rate": float(sampling_rate), "seconds": encoder.spec.n_samples / float(sampling_rate),
        "leads": list(leads), "normalize": normalize, "bandpass": [],
    }
    return {"encoder": encoder, "component": "cropa_vit", "options": options, "preprocess": preprocess,
            "extra": {"reference": metadata}}

# ---------------------------------------------------------------------- helpers
def _require(state_dict: Mapping[str, torch.Tensor], keys: Sequence[str], source: str, what: str) -> None:
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: the {what} weights are a {type(state_dict).__name__}, not a state_dict.")
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise CheckpointError(
            f"{source}: missing {missing} -- not an ECG-JEPA reference {what} state_dict "
            f"(found keys such as {sorted(state_dict)[:5]})."
        )


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _rename(
    state_dict: Mapping[str, torch.Tensor],
    renames: Sequence[tuple[str, str]],
    skip: set[str],
    source: str,
    what: str,
) -> dict[str, torch.Tensor]:
    out, unexpected = {}, []
    for key, value in state_dict.items():
        if key in skip:
            continue
        for old, new in renames:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys in the {what} state_dict: {unexpected}.")
    return out


def _load(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str, what: str) -> None:
    expected = module.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the {what} state_dict does not match the architecture read from it: "
            f"missing {missing}, unexpected {unexpected}."
        )
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state_dict.items() if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise CheckpointError(f"{source}: {what} tensors with unexpected shapes: {wrong}.")
    module.load_state_dict({k: v.float() for k, v in state_dict.items()})


def _check_pos(stored: torch.Tensor, ours: torch.Tensor, source: str, what: str) -> None:
    if tuple(stored.shape) != tuple(ours.shape):
        raise CheckpointError(
            f"{source}: {what} pos_embed has shape {tuple(stored.shape)}, expected {tuple(ours.shape)}."
        )
    diff = float((stored.float() - ours).abs().max())
    if diff > _POS_TOLERANCE:
        raise CheckpointError(
            f"{source}: {what} pos_embed differs from the fixed sin-cos table (max diff {diff:.3g}); only "
            f"pos_type='sincos' reference checkpoints can be imported."
        )
