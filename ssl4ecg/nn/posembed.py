"""Fixed sine-cosine positional embeddings (1-D and the 2-D lead x time layout).

All tables are computed in float64 and returned as float32, so that they match reference
implementations that build them with NumPy to the last bit of float32.

Channel layouts:

* :func:`sincos_1d` -- ``[sin(p*w_0..), cos(p*w_0..)]`` with ``w_k = 10000 ** (-k / (dim/2))``.
* :func:`sincos_2d` -- lead-major rows ``(lead, slot)``; the FIRST half of the channels is
  ``sincos_1d(slot, dim/2)`` (time), the SECOND half ``sincos_1d(lead, dim/2)`` (lead).
  This is the ECG-JEPA reference layout.
* :func:`sincos_2d_time_only` -- the 2-D layout evaluated at lead 0, i.e.
  ``[sin(s*w), cos(s*w), 0..., 1...]``: the ECG-JEPA predictor's 1-D time embedding.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _positions(positions: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(positions, dtype=torch.float64).reshape(-1)


def _sincos_1d_f64(positions: torch.Tensor, dim: int) -> torch.Tensor:
    if dim % 2 != 0 or dim <= 0:
        raise ValueError(f"a sin-cos embedding needs a positive even width, got {dim}")
    half = dim // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = positions[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_1d(positions: Sequence[int] | torch.Tensor, dim: int) -> torch.Tensor:
    """1-D sin-cos table ``[len(positions), dim]`` (float32): first half sin, second half cos."""
    return _sincos_1d_f64(_positions(positions), dim).float()


def sincos_2d(
    lead_positions: Sequence[int] | torch.Tensor,
    slot_positions: Sequence[int] | torch.Tensor,
    dim: int,
) -> torch.Tensor:
    """2-D lead x time table ``[n_leads * n_slots, dim]`` (float32), lead-major rows.

    Row ``l * n_slots + s`` is ``concat(sincos_1d(slot_s, dim/2), sincos_1d(lead_l, dim/2))``:
    time in the first half of the channels, lead in the second. ``dim`` must be divisible by 4.
    """
    if dim % 4 != 0:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    leads, slots = _positions(lead_positions), _positions(slot_positions)
    time_part = _sincos_1d_f64(slots, dim // 2)  # [S, dim/2]
    lead_part = _sincos_1d_f64(leads, dim // 2)  # [L, dim/2]
    grid = torch.cat(
        [
            time_part[None, :, :].expand(len(leads), -1, -1),
            lead_part[:, None, :].expand(-1, len(slots), -1),
        ],
        dim=2,
    )
    return grid.reshape(len(leads) * len(slots), dim).float()


def sincos_2d_time_only(slot_positions: Sequence[int] | torch.Tensor, dim: int) -> torch.Tensor:
    """Time-only table ``[n_slots, dim]`` in the 2-D layout at lead 0: ``[sin, cos, 0..., 1...]``."""
    return sincos_2d([0], slot_positions, dim)
