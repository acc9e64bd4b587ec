"""Cross-Pattern Attention (CroPA) without a per-sample mask: dense, factorised and FlexAttention paths.

Tokens form a lead-major grid: token ``k = lead * n_slots + slot``. CroPA lets a query
``(i, t)`` attend key ``(i', t')`` iff ``i == i'`` (same lead) or ``t == t'`` (same slot), so
each query sees ``n_slots + n_leads - 1`` of the ``n_leads * n_slots`` keys (57 of 400 at the
ECG-JEPA geometry). A :class:`CroPAGrid` describes that pattern by its shape only; it is
passed where a boolean mask would go and every backend turns it into what it needs:

* ``"dense"`` -- :func:`~torch.nn.functional.scaled_dot_product_attention` with one cached
  ``[N, N]`` bool mask per (geometry, device);
* ``"factorised"`` -- exact CroPA as two small attentions that share one softmax: within
  each lead (``[S, S]`` scores per lead) and within each slot (``[L, L]`` scores per slot,
  the query's own token excluded there because the lead part already has it). Their
  scores are normalised by a common max and denominator, which is exactly the softmax
  over the union of keys, so the result equals the dense masked attention (the
  ``400 x 400`` product is never formed). Scores and probabilities are kept in float32
  (or float64) whatever the input dtype, and the backward pass is written out;
* ``"flex"`` -- :func:`torch.nn.attention.flex_attention` with a cached block mask built from
  the rule (compiled on CUDA; on CPU it runs forward-only, unfused, and serves the tests).
  Note that lead-major CroPA leaves no block of the mask empty (every key block holds every
  slot), so FlexAttention saves the mask tensor, not attention FLOPs.

``"auto"`` picks flex on CUDA when available (dense if it fails), on CPU dense for short
sequences and for forward-only bf16/fp16 calls below 600 tokens (the fused CPU flash
kernel's good cases) and the factorised path otherwise (measurements in
``docs/performance.md``). ``$SSL4ECG_CROPA_BACKEND`` sets the process default and
:func:`use_backend` overrides it for a block.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "dense", "factorised", "flex")
#: on CPU, ``auto`` uses the dense kernel below this many tokens ...
DENSE_BELOW_TOKENS = 128
#: ... and for forward-only bf16/fp16 calls (the EMA teacher) below this many
DENSE_BF16_FORWARD_BELOW = 600
#: on CPU, unmasked bf16/fp16 attention with gradients up to this length uses blockwise_attention
BLOCKWISE_MAX_TOKENS = 128


def cropa_mask(n_leads: int, n_slots: int, device: torch.device | str | None = None) -> torch.Tensor:
    """CroPA attention mask ``[N, N]`` (bool, True = may attend) for a lead-major token grid.

    ``N = n_leads * n_slots``; token ``k`` is ``(lead k // n_slots, slot k % n_slots)``. The
    rule depends only on the grid shape, so the same mask serves any subset of leads and
    any set of visible slots that is shared by all leads of a sample.
    """
    index = torch.arange(n_leads * n_slots, device=device)
    lead, slot = index // n_slots, index % n_slots
    return (lead[:, None] == lead[None, :]) | (slot[:, None] == slot[None, :])


@dataclass(frozen=True)
class CroPAGrid:
    """The CroPA pattern of an ``n_leads x n_slots`` lead-major grid, usable as an ``attn_mask``."""

    n_leads: int
    n_slots: int

    @property
    def n_tokens(self) -> int:
        return self.n_leads * self.n_slots

    def dense_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The ``[N, N]`` bool mask, built once per (geometry, device) and shared."""
        return _cached_mask(self.n_leads, self.n_slots, str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=64)
def _cached_mask(n_leads: int, n_slots: int, device: str) -> torch.Tensor:
    return cropa_mask(n_leads, n_slots, device)


# ---------------------------------------------------------------------------- dispatch
#: the process-wide default: $SSL4ECG_CROPA_BACKEND or "auto"; use_backend() changes it for a block
_BACKEND = [os.environ.get("SSL4ECG_CROPA_BACKEND", "auto")]


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run CroPA through ``backend`` (one of :data:`BACKENDS`) inside the ``with`` block."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown CroPA backend '{backend}'; choose one of {BACKENDS}")
    previous, _BACKEND[0] = _BACKEND[0], backend
    try:
        yield
    finally:
        _BACKEND[0] = previous


def cropa_attention(qkv: torch.Tensor, heads: int, grid: CroPAGrid, backend: str | None = None) -> torch.Tensor:
    """CroPA self-attention of a packed projection ``qkv`` ``[B, N, 3 * D]`` -> ``[B, N, D]``.

    ``qkv`` channels are ``[q | k | v]``, each split into ``heads`` heads of ``D // heads``
    (the :class:`ssl4ecg.nn.transformer.Attention` layout); logits are scaled by
    ``head_dim ** -0.5``. The output has the input's dtype and heads concatenated per token.
    ``backend`` defaults to the one set by :func:`use_backend` (``"auto"``).
    """
    batch, n_tokens, width = qkv.shape
    if n_tokens != grid.n_tokens:
        raise ValueError(f"{n_tokens} tokens do not form the CroPA grid {grid.n_leads} x {grid.n_slots}")
    if width % (3 * heads) != 0:
        raise ValueError(f"qkv width {width} is not 3 x heads ({heads}) x head_dim")
    backend = resolve_backend(backend or _BACKEND[0], qkv)
    if backend == "factorised":
        return _FactorisedCroPA.apply(qkv, grid.n_leads, grid.n_slots, heads, True)
    if backend == "flex":
        return _flex_cropa(qkv, heads, grid)
    return packed_sdpa(qkv, heads, grid.dense_mask(qkv.device))


def resolve_backend(backend: str, qkv: torch.Tensor) -> str:
    """The concrete backend ``auto`` stands for, given the input's device, dtype and autograd state."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown CroPA backend '{backend}'; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if qkv.device.type == "cuda":
        return "flex" if flex_available() and not _FLEX_FAILED else "dense"
    if qkv.device.type == "cpu":
        # crossovers measured with benchmarks/attention_scaling.py (docs/performance.md): the
        # fused CPU flash kernel wins on short sequences and, forward-only, in bf16
        n_tokens = qkv.shape[1]
        low_precision = qkv.dtype in (torch.bfloat16, torch.float16)
        needs_grad = torch.is_grad_enabled() and qkv.requires_grad
        if n_tokens < DENSE_BELOW_TOKENS or (low_precision and not needs_grad and n_tokens < DENSE_BF16_FORWARD_BELOW):
            return "dense"
        return "factorised"
    return "dense"


def packed_sdpa(qkv: torch.Tensor, heads: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Plain attention over a packed ``[B, N, 3 * D]`` projection -> ``[B, N, D]`` (SDPA semantics).

    On CPU, low-precision inputs that need gradients run in float32: the CPU flash kernel's
    bf16 backward is several times slower than its float32 one (docs/performance.md). Short
    unmasked sequences (the JEPA predictor's 50 slots) then use :func:`blockwise_attention`,
    which casts and lays out ``q, k, v`` in one pass.
    """
    batch, n_tokens, width = qkv.shape
    dim = width // 3
    if (qkv.device.type == "cpu" and qkv.dtype in (torch.bfloat16, torch.float16)
            and torch.is_grad_enabled() and qkv.requires_grad):
        if attn_mask is None and n_tokens <= BLOCKWISE_MAX_TOKENS:
            return blockwise_attention(qkv, heads)
        q, k, v = qkv.view(batch, n_tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
        out = out.to(qkv.dtype)
    else:
        q, k, v = qkv.view(batch, n_tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return out.transpose(1, 2).reshape(batch, n_tokens, dim)


def blockwise_attention(qkv: torch.Tensor, heads: int, n_blocks: int = 1) -> torch.Tensor:
    """Full attention within each of ``n_blocks`` consecutive token blocks (no attention across them).

    ``qkv`` is ``[B, n_blocks * S, 3 * D]``; the result equals SDPA with a block-diagonal mask
    (with ``n_blocks=1``: plain full attention). It runs the lead part of the factorised
    kernel: float32 scores, written-out backward.
    """
    batch, n_tokens, _ = qkv.shape
    if n_tokens % n_blocks != 0:
        raise ValueError(f"{n_tokens} tokens do not split into {n_blocks} equal blocks")
    return _FactorisedCroPA.apply(qkv, n_blocks, n_tokens // n_blocks, heads, False)


# ---------------------------------------------------------------------------- factorised
class _FactorisedCroPA(torch.autograd.Function):
    """Exact CroPA as lead-wise plus slot-wise attention with one shared softmax.

    Shapes: ``qkv`` ``[B, L * S, 3 * H * dh]`` -> ``[B, L * S, H * dh]``. Internally
    ``a`` is ``[3, B, H, L, S, dh]`` (lead layout) and ``t`` ``[3, B, H, S, L, dh]`` (slot
    layout); ``p1`` ``[B*H*L, S, S]`` and ``p2`` ``[B*H*S, L, L]`` are the normalised
    probabilities of the two key groups, saved for the backward pass. With ``cross=False``
    only the lead part runs: full attention within each lead (e.g. the JEPA predictor).
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, n_leads: int, n_slots: int, heads: int, cross: bool) -> torch.Tensor:
        with torch.autocast(qkv.device.type, enabled=False):  # scores stay in the working dtype
            return _FactorisedCroPA._forward(ctx, qkv, n_leads, n_slots, heads, cross)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _FactorisedCroPA._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, qkv: torch.Tensor, n_leads: int, n_slots: int, heads: int, cross: bool) -> torch.Tensor:
        batch, n_tokens, width = qkv.shape
        L, S, H, dh = n_leads, n_slots, heads, width // (3 * heads)
        work = torch.promote_types(qkv.dtype, torch.float32)
        scale = dh ** -0.5
        a = _packed_copy(qkv.view(batch, L, S, 3, H, dh).permute(3, 0, 4, 1, 2, 5), work)
        q1, k1, v1 = (a[i].view(-1, S, dh) for i in range(3))
        p1 = torch.bmm(q1, k1.transpose(1, 2)).mul_(scale)  # [BHL, S, S]
        lead_view = (batch, H, L, S)
        peak = p1.amax(-1).view(lead_view)
        if cross:
            t = a.transpose(3, 4).contiguous()
            q2, k2, v2 = (t[i].view(-1, L, dh) for i in range(3))
            p2 = torch.bmm(q2, k2.transpose(1, 2)).mul_(scale)  # [BHS, L, L]
            p2.diagonal(dim1=1, dim2=2).fill_(float("-inf"))  # own token: counted in the lead part
            peak = torch.maximum(peak, p2.amax(-1).view(batch, H, S, L).transpose(2, 3))
            p2.sub_(peak.transpose(2, 3).reshape(-1, L, 1)).exp_()
        p1.sub_(peak.reshape(-1, S, 1)).exp_()
        total = p1.sum(-1).view(lead_view)
        if cross:
            total = total + p2.sum(-1).view(batch, H, S, L).transpose(2, 3)
        inv = total.reciprocal_()
        p1.mul_(inv.reshape(-1, S, 1))
        out = torch.bmm(p1, v1).view(batch, H, L, S, dh)
        if cross:
            p2.mul_(inv.transpose(2, 3).reshape(-1, L, 1))
            out.add_(torch.bmm(p2, v2).view(batch, H, S, L, dh).transpose(2, 3))
            ctx.save_for_backward(a, t, p1, p2, out)
        else:
            ctx.save_for_backward(a, p1, out)
        ctx.geometry = (L, S, H, dh, qkv.dtype, cross)
        return out.permute(0, 2, 3, 1, 4).reshape(batch, n_tokens, H * dh).to(qkv.dtype)

    @staticmethod
    def _backward(ctx, grad_out: torch.Tensor):
        L, S, H, dh, dtype, cross = ctx.geometry
        if cross:
            a, t, p1, p2, out = ctx.saved_tensors
        else:
            a, p1, out = ctx.saved_tensors
        batch = a.shape[1]
        scale = dh ** -0.5
        g1 = _packed_copy(grad_out.view(batch, L, S, H, dh).permute(0, 3, 1, 2, 4), a.dtype)  # [B, H, L, S, dh]
        delta = (g1 * out).sum(-1)  # [B, H, L, S]: rowsum(dP * P) of the shared softmax
        q1, k1, v1 = (a[i].view(-1, S, dh) for i in range(3))
        do1 = g1.view(-1, S, dh)
        ds1 = torch.bmm(do1, v1.transpose(1, 2)).sub_(delta.reshape(-1, S, 1)).mul_(p1).mul_(scale)
        d_qkv = torch.empty(batch, L, S, 3, H, dh, dtype=dtype, device=a.device)
        d_view = d_qkv.permute(3, 0, 4, 1, 2, 5)  # [3, B, H, L, S, dh]
        lead_parts = (torch.bmm(ds1, k1), torch.bmm(ds1.transpose(1, 2), q1), torch.bmm(p1.transpose(1, 2), do1))
        if cross:
            g2 = g1.transpose(2, 3).contiguous()  # [B, H, S, L, dh]
            q2, k2, v2 = (t[i].view(-1, L, dh) for i in range(3))
            do2 = g2.view(-1, L, dh)
            ds2 = torch.bmm(do2, v2.transpose(1, 2))
            ds2.sub_(delta.transpose(2, 3).reshape(-1, L, 1)).mul_(p2).mul_(scale)
            slot_parts = (torch.bmm(ds2, k2), torch.bmm(ds2.transpose(1, 2), q2), torch.bmm(p2.transpose(1, 2), do2))
            for index, (lead, slot) in enumerate(zip(lead_parts, slot_parts)):
                lead = lead.view(batch, H, L, S, dh).add_(slot.view(batch, H, S, L, dh).transpose(2, 3))
                d_view[index].copy_(lead)
        else:
            for index, lead in enumerate(lead_parts):
                d_view[index].copy_(lead.view(batch, H, L, S, dh))
        return d_qkv.view(batch, L * S, 3 * H * dh), None, None, None, None


def _packed_copy(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a contiguous tensor of ``dtype`` in one pass (layout change and cast together)."""
    if x.dtype == dtype and x.is_contiguous():
        return x
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


# ---------------------------------------------------------------------------- flex
_FLEX_FAILED = False


@functools.lru_cache(maxsize=1)
def flex_available() -> bool:
    """True when :mod:`torch.nn.attention.flex_attention` can be imported."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=64)
def _flex_block_mask(n_leads: int, n_slots: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def rule(b, h, q, k):  # noqa: ARG001 - flex mask_mod signature
        return (q // n_slots == k // n_slots) | (q % n_slots == k % n_slots)

    n_tokens = n_leads * n_slots
    return create_block_mask(rule, None, None, n_tokens, n_tokens, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)  # shapes change with the visible count: automatic dynamic


def _flex_cropa(qkv: torch.Tensor, heads: int, grid: CroPAGrid) -> torch.Tensor:
    """CroPA through FlexAttention (compiled on CUDA; eager, forward-only, elsewhere)."""
    global _FLEX_FAILED
    from torch.nn.attention.flex_attention import flex_attention

    batch, n_tokens, width = qkv.shape
    dim = width // 3
    q, k, v = qkv.view(batch, n_tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
    block_mask = _flex_block_mask(grid.n_leads, grid.n_slots, str(qkv.device))
    if qkv.device.type == "cuda":
        try:
            out = _compiled_flex()(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=block_mask)
        except Exception as error:  # pragma: no cover - depends on the CUDA/Triton install
            _FLEX_FAILED = True
            warnings.warn(f"FlexAttention failed ({error}); CroPA falls back to the dense masked path",
                          RuntimeWarning, stacklevel=3)
            return packed_sdpa(qkv, heads, grid.dense_mask(qkv.device))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile"
            out = flex_attention(q, k, v, block_mask=block_mask)
    return out.transpose(1, 2).reshape(batch, n_tokens, dim)
