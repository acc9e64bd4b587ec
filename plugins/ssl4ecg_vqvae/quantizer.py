"""A vector quantiser that does not collapse: k-means init, EMA codebook, dead-code restarts.

The three cures for codebook collapse (only a few codes ever chosen) are independent switches,
so that their effect can be measured:

* ``kmeans_init``: the codebook starts as k-means centroids of the first encoder outputs
  (at least ``codebook_size`` vectors, gathered over the first batches), not as random vectors
  far away from where the encoder's outputs live;
* ``ema``: codes move to the running mean of the vectors assigned to them (exponential moving
  averages of counts and sums), instead of by a codebook-loss gradient;
* ``restarts``: a code not chosen in the last ``dead_after`` optimiser steps is re-seeded with
  a random recent encoder output.

Statistics are gathered in :meth:`VectorQuantizer.forward` (training mode) and applied in
:meth:`VectorQuantizer.update`, called once per optimiser step, so gradient accumulation and
several data-parallel ranks update the codebook exactly once per step with all their vectors.
All randomness comes from the generator passed in (the training loop's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class Quantized:
    """Output of the quantiser for ``M`` vectors.

    ``quantized_st`` carries the straight-through gradient to the inputs; ``quantized`` is the
    chosen code vectors themselves; ``codes`` their indices ``[M]``; ``commitment`` the
    commitment loss ``||z - sg(q)||^2``; ``codebook_loss`` ``||sg(z) - q||^2`` (zero-valued
    and unused with EMA updates).
    """

    quantized_st: torch.Tensor
    quantized: torch.Tensor
    codes: torch.Tensor
    commitment: torch.Tensor
    codebook_loss: torch.Tensor


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (squared Euclidean distance) of every row of ``z`` ``[M, d]``."""
    d2 = z.pow(2).sum(1, keepdim=True) - 2.0 * z @ codebook.t() + codebook.pow(2).sum(1)[None, :]
    return d2.argmin(dim=1)


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of ``x`` ``[M, d]`` (M >= k) from k distinct random points.

    Returns ``(centroids [k, d], counts [k])``; a cluster that empties is re-seeded with a
    random point. Deterministic given ``generator``.
    """
    x = x.float()
    m = x.shape[0]
    centroids = x[torch.randperm(m, generator=generator)[:k]].clone()
    counts = torch.zeros(k)
    for _ in range(max(1, iters)):
        assign = nearest_codes(x, centroids)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1.0)[:, None])
        if empty.any():
            pick = torch.randint(0, m, (int(empty.sum()),), generator=generator)
            centroids[empty] = x[pick]
    return centroids, counts


def perplexity(counts: torch.Tensor) -> float:
    """``exp`` of the entropy of the code distribution given by ``counts`` (1 = one code, K = uniform)."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


class VectorQuantizer(nn.Module):
    """Codebook of ``codebook_size`` vectors of ``dim`` with the collapse cures as switches.

    ``decay`` is the EMA decay of counts and sums, ``epsilon`` the running count below which a
    code is not moved by the EMA,
    ``kmeans_iters`` the Lloyd iterations of the initialisation, ``dead_after`` the number of
    steps without a vector after which a code is restarted and ``usage_window`` the number of recent
    training batches over which usage (the fraction of codes chosen at least once) is measured.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        ema: bool = True,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        restarts: bool = True,
        dead_after: int = 20,
        usage_window: int = 50,
        reservoir: int = 4096,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if codebook_size < 2 or dim < 1:
            raise ValueError(f"codebook_size must be >= 2 and dim >= 1, got {codebook_size}, {dim}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if usage_window < 1:
            raise ValueError(f"usage_window must be >= 1, got {usage_window}")
        self.codebook_size, self.dim = int(codebook_size), int(dim)
        self.use_ema, self.decay, self.epsilon = bool(ema), float(decay), float(epsilon)
        self.kmeans_init, self.kmeans_iters = bool(kmeans_init), int(kmeans_iters)
        if dead_after < 1:
            raise ValueError(f"dead_after must be >= 1, got {dead_after}")
        self.restarts, self.dead_after = bool(restarts), int(dead_after)
        self.reservoir = int(reservoir)
        self.normalize = bool(normalize)
        # the classic VQ-VAE initialisation (used when kmeans_init is off)
        init = torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if self.use_ema:
            self.register_buffer("codebook", init)
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_sum", torch.zeros(codebook_size, dim))
        # total weight of the EMA so far (bias correction of the running counts)
        self.register_buffer("ema_weight", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(not self.kmeans_init))
        self.register_buffer("hits", torch.zeros(usage_window, codebook_size))
        self.register_buffer("hits_pos", torch.tensor(0, dtype=torch.long))
        self.register_buffer("restarted_total", torch.tensor(0, dtype=torch.long))
        # optimiser steps seen, and the step at which each code was last chosen (or re-seeded)
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("last_used", torch.zeros(codebook_size, dtype=torch.long))
        self._init_buffer: list[torch.Tensor] = []
        self._pending_counts: torch.Tensor | None = None
        self._pending_sums: torch.Tensor | None = None
        self._recent: torch.Tensor | None = None
        self.last_restarted = 0

    # ------------------------------------------------------------------ state

    def usage(self) -> float:
        """Fraction of codes chosen at least once over the last ``usage_window`` training batches."""
        return float((self.hits.sum(0) > 0).float().mean())

    def window_perplexity(self) -> float:
        """Perplexity of the code counts over the usage window."""
        return perplexity(self.hits.sum(0))

    @torch.no_grad()
    def _maybe_initialize(self, z: torch.Tensor, generator: torch.Generator) -> None:
        """Gather vectors until there are ``codebook_size`` of them, then run k-means on them."""
        self._init_buffer.append(z.detach().float().cpu())
        have = sum(t.shape[0] for t in self._init_buffer)
        if have < self.codebook_size:
            return
        data = torch.cat(self._init_buffer)
        self._init_buffer = []
        cap = max(self.codebook_size * 32, 8192)
        if data.shape[0] > cap:
            data = data[torch.randperm(data.shape[0], generator=generator)[:cap]]
        centroids, counts = kmeans(data, self.codebook_size, self.kmeans_iters, generator)
        if self.normalize:
            centroids = F.normalize(centroids, dim=-1)
        centroids = centroids.to(self.codebook.device)
        self.codebook.data.copy_(centroids)
        # EMA statistics as if every code had been seen at its k-means share
        share = counts.to(self.cluster_size.device) * (z.shape[0] / data.shape[0])
        self.cluster_size.copy_(share)
        self.embed_sum.copy_(centroids * share[:, None])
        self.ema_weight.fill_(1.0)
        self.initialized.fill_(True)
        _broadcast(self.codebook.data, self.cluster_size, self.embed_sum)

    # ------------------------------------------------------------------ forward / update

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> Quantized:
        """Quantise ``z`` ``[M, dim]`` (float32 math, outside autocast)."""
        z = z.float()
        if self.normalize:
            z = F.normalize(z, dim=-1)
        if self.training and not bool(self.initialized):
            self._maybe_initialize(z, generator if generator is not None else torch.Generator().manual_seed(0))
        codebook = self.codebook.float()
        with torch.no_grad():
            codes = nearest_codes(z.detach(), codebook.detach())
        quantized = F.embedding(codes, codebook)
        commitment = F.mse_loss(z, quantized.detach())
        codebook_loss = F.mse_loss(quantized, z.detach()) if not self.use_ema else z.new_zeros(())
        quantized_st = z + (quantized - z).detach()
        if self.training:
            self._record(z.detach(), codes)
        return Quantized(quantized_st, quantized, codes, commitment, codebook_loss)

    @torch.no_grad()
    def _record(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        """Add this batch to the pending EMA statistics, the usage window and the reservoir."""
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        sums = torch.zeros(self.codebook_size, self.dim, device=z.device).index_add_(0, codes, z)
        self._pending_counts = counts if self._pending_counts is None else self._pending_counts + counts
        self._pending_sums = sums if self._pending_sums is None else self._pending_sums + sums
        pos = int(self.hits_pos) % self.hits.shape[0]
        self.hits[pos] = counts.to(self.hits.device)
        self.hits_pos.fill_(pos + 1)
        stride = max(1, -(-z.shape[0] // self.reservoir))
        self._recent = z[::stride].clone()

    @torch.no_grad()
    def update(self, generator: torch.Generator) -> int:
        """Apply the step's EMA update and restart dead codes; returns the number restarted."""
        self.last_restarted = 0
        if self._pending_counts is None or not bool(self.initialized):
            self._pending_counts = self._pending_sums = None
            return 0
        counts, sums = _all_reduce(self._pending_counts, self._pending_sums)
        self._pending_counts = self._pending_sums = None
        d = self.decay
        self.ema_weight.mul_(d).add_(1.0 - d)
        self.cluster_size.mul_(d).add_(counts, alpha=1.0 - d)
        if self.use_ema:
            self.embed_sum.mul_(d).add_(sums, alpha=1.0 - d)
            # a code moves to the running mean of its vectors; one never chosen stays put
            alive = self.cluster_size > self.epsilon
            means = self.embed_sum[alive] / self.cluster_size[alive, None]
            self.codebook.data[alive] = F.normalize(means, dim=-1) if self.normalize else means
        self.steps.add_(1)
        self.last_used[counts.to(self.last_used.device) > 0] = self.steps
        if self.restarts and self._recent is not None:
            self.last_restarted = self._restart_dead(counts.sum(), generator)
        return self.last_restarted

    @torch.no_grad()
    def _restart_dead(self, batch_vectors: torch.Tensor, generator: torch.Generator) -> int:
        """Re-seed every code not chosen in the last ``dead_after`` steps with a recent encoder output.

        The new code's EMA statistics are set to the uniform share of the step's vectors, and
        it counts as used now, so it has ``dead_after`` steps to attract vectors.
        """
        uniform = float(batch_vectors) / self.codebook_size
        dead = torch.nonzero(self.steps - self.last_used >= self.dead_after).flatten()
        if dead.numel() == 0:
            return 0
        recent = self._recent
        pick = torch.randint(0, recent.shape[0], (dead.numel(),), generator=generator)
        new = recent[pick.to(recent.device)].to(self.codebook.device)
        self.codebook.data[dead] = new
        self.cluster_size[dead] = uniform * self.ema_weight
        self.embed_sum[dead] = new * (uniform * self.ema_weight)
        self.last_used[dead] = self.steps
        _broadcast(self.codebook.data, self.cluster_size, self.embed_sum)
        self.restarted_total.add_(int(dead.numel()))
        return int(dead.numel())


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sum ``tensors`` over data-parallel ranks (no-op on one process)."""
    if _distributed():
        for t in tensors:
            torch.distributed.all_reduce(t)
    return tensors


def _broadcast(*tensors: torch.Tensor) -> None:
    """Make rank 0's ``tensors`` everyone's (no-op on one process)."""
    if _distributed():
        for t in tensors:
            torch.distributed.broadcast(t, 0)


__all__ = ["Quantized", "VectorQuantizer", "kmeans", "nearest_codes", "perplexity"]
