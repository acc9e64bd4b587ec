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
* ``"flex"`` -- :func:`torch.nn.attention.flex_attention` with a block mask cached per
  geometry, the token count padded to a 128-multiple bucket and a rule over index tensors,
  so one compiled kernel serves every visible-slot count (about two compilations a run; see
  the notes above :func:`flex_stats`). Compiled on CUDA; on CPU forward-only (eager unless
  :data:`FLEX_COMPILE_ON_CPU`), for the tests. If flex fails in the forward or the backward
  pass, CroPA warns once and uses the dense path for the rest of the process;
  :func:`flex_stats` counts compilations and fallbacks. Lead-major CroPA leaves no block of
  the mask empty (every key block holds every slot), so FlexAttention saves the mask
  tensor, not attention FLOPs.

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
# Compile once for all steps. Multi-block masking gives the student a different number of
# visible slots every step, so the grid L x S_vis (and the token count) changes every step.
# Three things keep the compiled flex_attention from recompiling per step:
#
# * the rule reads index tensors (lead-of-token, slot-of-token) instead of Python ints, and
#   every block mask's rule is a closure of the one factory ``_cropa_rule`` (same code
#   object), so a new geometry changes tensor *values*, never a guarded constant;
# * the token count is padded to a bucket: a multiple of FlexAttention's 128-token block,
#   at least two blocks (a one-block mask has size-1 dimensions, which dynamo specialises
#   and compiles separately). Padded tokens get lead = slot = -1, so real queries never see
#   padded keys (and padded queries, whose rows are discarded, see only padded keys, so no
#   row is empty). On CUDA this costs no attention work for N > 128: the kernels run whole
#   128-token blocks anyway;
# * block masks are cached per (leads, slots, bucket, device).
#
# The 8 x 10..40 grids then take two bucket shapes (256, 384); dynamo compiles the first
# shape statically and the second as one dynamic-shape graph that serves every later
# bucket, so a run compiles at most ~2 graphs per (grad mode, dtype), far below dynamo's
# recompile limit (8), past which it would silently run flex eagerly (materialised scores).
# Even where a torch version guards the shapes statically, compilations stay at one per
# bucket. flex_stats() reports what happened.

_FLEX_FAILED = False
#: compile flex on CPU too (forward only: CPU FlexAttention has no backward); tests set it
FLEX_COMPILE_ON_CPU = False
#: token counts are padded to a multiple of this (FlexAttention's default block size) ...
FLEX_BLOCK = 128
#: ... and to at least this many blocks
FLEX_MIN_BLOCKS = 2
_FLEX_STATS = {"compilations": 0, "fallbacks": 0, "failed": False, "last_error": None, "limit_warned": False}


def flex_stats() -> dict:
    """What the FlexAttention CroPA path did in this process (since :func:`reset_flex_stats`).

    ``compilations``: graphs dynamo compiled for flex (forward graphs; at most ~2 expected);
    ``fallbacks``: calls routed to flex that ran the dense masked path instead (the failing
    call included); ``failed``: flex failed once and is off for the rest of the process;
    ``last_error``: that failure, as ``"Type: message"``, else None.
    """
    return {key: _FLEX_STATS[key] for key in ("compilations", "fallbacks", "failed", "last_error")}


def reset_flex_stats() -> None:
    """Zero :func:`flex_stats` and clear a recorded failure (flex is tried again on the next call)."""
    global _FLEX_FAILED
    _FLEX_FAILED = False
    _FLEX_STATS.update(compilations=0, fallbacks=0, failed=False, last_error=None, limit_warned=False)


@functools.lru_cache(maxsize=1)
def flex_available() -> bool:
    """True when :mod:`torch.nn.attention.flex_attention` can be imported."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_bucket(n_tokens: int) -> int:
    """The padded token count flex runs ``n_tokens`` at: a multiple of 128, at least 256."""
    return max(FLEX_MIN_BLOCKS, -(-n_tokens // FLEX_BLOCK)) * FLEX_BLOCK


def _cropa_rule(lead: torch.Tensor, slot: torch.Tensor):
    """The CroPA mask_mod over per-token index tensors (one code object for every geometry)."""

    def rule(b, h, q, k):  # noqa: ARG001 - flex mask_mod signature
        return (lead[q] == lead[k]) | (slot[q] == slot[k])

    return rule


@functools.lru_cache(maxsize=128)
def _flex_block_mask(n_leads: int, n_slots: int, n_padded: int, device: str):
    """The block mask of the ``n_leads x n_slots`` grid padded to ``n_padded`` tokens (cached)."""
    from torch.nn.attention.flex_attention import create_block_mask

    index = torch.arange(n_padded, device=device)
    real = index < n_leads * n_slots
    lead = torch.where(real, index // n_slots, -1)
    slot = torch.where(real, index % n_slots, -1)
    return create_block_mask(_cropa_rule(lead, slot), None, None, n_padded, n_padded, device=device,
                             BLOCK_SIZE=FLEX_BLOCK)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)  # automatic dynamic: the second bucket shape compiles a dynamic graph


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _run_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, compiled: bool) -> torch.Tensor:
    """flex_attention, compiled or eager, counting the graphs dynamo compiles for it."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile"
            return flex_attention(q, k, v, block_mask=block_mask)
    before = _graphs_compiled()
    try:
        return _compiled_flex()(q, k, v, block_mask=block_mask)
    finally:
        _FLEX_STATS["compilations"] += _graphs_compiled() - before
        _warn_at_recompile_limit()


def _warn_at_recompile_limit() -> None:
    config = torch._dynamo.config
    limit = getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8))
    if _FLEX_STATS["compilations"] >= limit and not _FLEX_STATS["limit_warned"]:
        _FLEX_STATS["limit_warned"] = True
        warnings.warn(f"FlexAttention CroPA compiled {_FLEX_STATS['compilations']} graphs, dynamo's recompile "
                      f"limit ({limit}); new shapes now run flex eagerly (slow). Report the grid sizes, or set "
                      f"SSL4ECG_CROPA_BACKEND=dense", RuntimeWarning, stacklevel=4)


def _flex_failure(error: BaseException, where: str) -> None:
    """Record a flex failure: flex stays off for the process, and it is said once, loudly."""
    global _FLEX_FAILED
    _FLEX_STATS["fallbacks"] += 1
    if _FLEX_FAILED:
        return
    _FLEX_FAILED = True
    _FLEX_STATS["failed"] = True
    _FLEX_STATS["last_error"] = f"{type(error).__name__}: {error}"
    warnings.warn(f"FlexAttention CroPA failed in the {where} pass ({type(error).__name__}: {error}); "
                  f"CroPA uses the dense masked path for the rest of this process", RuntimeWarning, stacklevel=2)


class _GuardedFlex(torch.autograd.Function):
    """flex_attention whose forward AND backward fall back to dense masked SDPA if flex fails.

    Forward runs (compiled) flex on detached copies of ``q, k, v`` ``[B, H, Np, dh]`` under
    grad mode and keeps that small graph; backward differentiates it, and if that raises
    (e.g. a Triton backward kernel that does not fit), recomputes the real ``n`` tokens with
    SDPA and the dense CroPA mask and differentiates that instead. The failure is sticky.
    """

    @staticmethod
    def forward(ctx, q, k, v, block_mask, grid, compiled):
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(x.requires_grad) for x in (q, k, v)]
            out = _run_flex(*leaves, block_mask, compiled)
        ctx.graph = (leaves, out)
        ctx.grid = grid
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.graph is None:
            raise RuntimeError("FlexAttention CroPA cannot run its backward twice (it frees its graph); "
                               "use backend 'dense' or 'factorised' for retain_graph/double backward")
        leaves, out = ctx.graph
        ctx.graph = None  # frees flex's saved tensors now, not when the loss tensor dies
        wanted = [x for x in leaves if x.requires_grad]
        try:
            if _FLEX_FAILED:
                raise _AlreadyFailed
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        except Exception as error:  # depends on the CUDA/Triton install
            _flex_failure(error, "backward")
            n, mask = ctx.grid.n_tokens, ctx.grid.dense_mask(grad_out.device)
            with torch.enable_grad(), torch.autocast(grad_out.device.type, enabled=False):
                dense = F.scaled_dot_product_attention(*(x[:, :, :n] for x in leaves), attn_mask=mask)
                grads = iter(torch.autograd.grad(dense, wanted, grad_out[:, :, :n]))
        return (*(next(grads) if x.requires_grad else None for x in leaves), None, None, None)


class _AlreadyFailed(Exception):
    """flex failed in an earlier call's backward: this one's backward goes dense directly."""


def _flex_cropa(qkv: torch.Tensor, heads: int, grid: CroPAGrid, compiled: bool | None = None) -> torch.Tensor:
    """CroPA through FlexAttention (compiled on CUDA, or on CPU with :data:`FLEX_COMPILE_ON_CPU`
    or ``compiled=True``; eager otherwise).

    Why it compiles about twice per run, not once per visible-slot count: the block mask's
    rule reads lead/slot index tensors (no Python ints to guard on), the token count is
    padded to a :func:`flex_bucket` of at least two 128-token blocks (few shapes, none with
    size-1 block dims) and ``q, k, v`` are always contiguous, so dynamo sees only a few
    shapes and covers them with one dynamic graph (the notes above :func:`flex_stats`).
    Padded keys are invisible to real queries and padded query rows are dropped, so the
    result is the dense path's. Any failure, forward or backward, switches to the dense
    masked path for the rest of the process, with one ``RuntimeWarning``.
    """
    batch, n_tokens, width = qkv.shape
    dim = width // 3
    if _FLEX_FAILED:
        _FLEX_STATS["fallbacks"] += 1
        return packed_sdpa(qkv, heads, grid.dense_mask(qkv.device))
    if compiled is None:
        compiled = qkv.device.type == "cuda" or FLEX_COMPILE_ON_CPU
    n_padded = flex_bucket(n_tokens)
    # one zero-padded buffer, so q, k, v are contiguous [B, H, Np, dh] whatever N is (the
    # compiled graph guards on strides; F.pad keeps the input's layout when it pads nothing)
    padded = qkv.new_zeros(3, batch, heads, n_padded, dim // heads)
    padded[:, :, :, :n_tokens].copy_(qkv.view(batch, n_tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4))
    q, k, v = padded.unbind(0)
    block_mask = _flex_block_mask(grid.n_leads, grid.n_slots, n_padded, str(qkv.device))
    if torch.compiler.is_compiling():  # inside an outer torch.compile: it compiles flex with the rest
        from torch.nn.attention.flex_attention import flex_attention

        out = flex_attention(q, k, v, block_mask=block_mask)
    else:
        try:
            if torch.is_grad_enabled() and qkv.requires_grad:
                out = _GuardedFlex.apply(q, k, v, block_mask, grid, compiled)
            else:
                out = _run_flex(q, k, v, block_mask, compiled)
        except Exception as error:  # depends on the CUDA/Triton install
            _flex_failure(error, "forward")
            return packed_sdpa(qkv, heads, grid.dense_mask(qkv.device))
    return out[:, :, :n_tokens].transpose(1, 2).reshape(batch, n_tokens, dim)
