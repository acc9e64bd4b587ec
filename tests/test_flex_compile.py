"""The FlexAttention CroPA path: one compiled kernel for every visible-slot count, guarded fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch

from ssl4ecg.nn import attention_cropa
from ssl4ecg.nn.attention_cropa import (
    CroPAGrid,
    cropa_attention,
    flex_available,
    flex_bucket,
    flex_stats,
    reset_flex_stats,
)

pytestmark = pytest.mark.skipif(not flex_available(), reason="torch.nn.attention.flex_attention is not available")

N_LEADS = 8


@pytest.fixture(autouse=True)
def clean_flex_state():
    """Every test starts with flex healthy and zeroed counters, and leaves it that way."""
    reset_flex_stats()
    yield
    reset_flex_stats()


def visible_counts(steps: int, seed: int = 0) -> list[int]:
    """Visible-slot counts like multi-block masking of 50 slots: 10..40, largest/middle/smallest first.

    The fixed start (two bucket sizes, then a one-block grid of 80 tokens) is the order that
    costs extra compilations when one-block grids are not padded to two blocks.
    """
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randint(10, 41, (steps - 3,), generator=generator).tolist()
    return [40, 25, 10] + drawn


def packed_qkv(n_slots: int, heads: int, head_dim: int, batch: int = 2, seed: int = 0, device="cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, N_LEADS * n_slots, 3 * heads * head_dim, generator=generator)
    return qkv.to(device)


def test_bucket_sizes():
    assert [flex_bucket(n) for n in (1, 80, 128, 129, 256, 257, 320, 400)] == [256, 256, 256, 256, 256, 384, 384, 512]


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [48, 64])
def test_compiled_flex_compiles_at_most_twice_over_50_varying_steps_and_matches_dense(monkeypatch, head_dim):
    """50 forward steps, 8 leads x 10..40 visible slots: <= 2 graphs, and the dense path's result."""
    monkeypatch.setattr(attention_cropa, "FLEX_COMPILE_ON_CPU", True)
    counts = visible_counts(50, seed=head_dim)
    assert len(set(counts)) > 20
    worst = 0.0
    with torch.no_grad():
        for step, n_slots in enumerate(counts):
            qkv = packed_qkv(n_slots, heads=2, head_dim=head_dim, seed=step)
            grid = CroPAGrid(N_LEADS, n_slots)
            flex = cropa_attention(qkv, 2, grid, "flex")
            dense = cropa_attention(qkv, 2, grid, "dense")
            assert flex.shape == dense.shape == (2, N_LEADS * n_slots, 2 * head_dim)
            worst = max(worst, float((flex - dense).abs().max()))
    stats = flex_stats()
    assert stats["fallbacks"] == 0 and not stats["failed"] and stats["last_error"] is None, stats
    # at least one graph was compiled for this head dim, and no more than two for all 50 steps
    assert 1 <= stats["compilations"] <= 2, stats
    assert worst < 1e-5, worst


def test_flex_forward_failure_falls_back_to_dense_once_and_loudly():
    """CPU FlexAttention has no backward, so a call with gradients fails in forward: dense takes over."""
    qkv = packed_qkv(6, heads=2, head_dim=8).requires_grad_()
    grid = CroPAGrid(N_LEADS, 6)
    with pytest.warns(RuntimeWarning, match=r"failed in the forward pass .*dense masked path"):
        out = cropa_attention(qkv, 2, grid, "flex")
    stats = flex_stats()
    assert stats["failed"] and stats["fallbacks"] == 1 and "backward" in stats["last_error"], stats
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the next call is silent
        again = cropa_attention(qkv, 2, grid, "flex")
    assert flex_stats()["fallbacks"] == 2
    dense = cropa_attention(qkv, 2, grid, "dense")
    weight = torch.randn_like(dense)
    for got in (out, again):
        torch.testing.assert_close(got, dense, atol=1e-6, rtol=1e-6)
        (grad,) = torch.autograd.grad((got * weight).sum(), qkv)
        (expected,) = torch.autograd.grad((dense * weight).sum(), qkv, retain_graph=True)
        torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-6)
    reset_flex_stats()
    assert flex_stats() == {"compilations": 0, "fallbacks": 0, "failed": False, "last_error": None}
    assert not attention_cropa._FLEX_FAILED


class _BackwardFails(torch.autograd.Function):
    """Returns a precomputed flex output; its backward raises like a Triton kernel that does not fit."""

    @staticmethod
    def forward(ctx, q, k, v, out):
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out):
        raise RuntimeError("out of resource: shared memory (fake backward failure)")


def test_flex_backward_failure_falls_back_to_dense_gradients_once(monkeypatch):
    """Two stacked flex calls whose backward fails: exact dense gradients, one warning, then dense."""
    real_run = attention_cropa._run_flex

    def forward_ok_backward_fails(q, k, v, block_mask, compiled):
        with torch.no_grad():
            out = real_run(q.detach(), k.detach(), v.detach(), block_mask, False)
        return _BackwardFails.apply(q, k, v, out)

    monkeypatch.setattr(attention_cropa, "_run_flex", forward_ok_backward_fails)
    torch.manual_seed(0)
    grid = CroPAGrid(N_LEADS, 5)
    project = torch.nn.Linear(16, 48)
    qkv = packed_qkv(5, heads=2, head_dim=8).requires_grad_()
    weight = torch.randn(2, grid.n_tokens, 16)

    def two_layers(backend: str) -> torch.Tensor:
        hidden = cropa_attention(qkv, 2, grid, backend)
        return cropa_attention(project(hidden), 2, grid, backend)

    out = two_layers("flex")
    assert flex_stats()["fallbacks"] == 0  # the forward passes ran flex
    dense = two_layers("dense")
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    params = (qkv, project.weight, project.bias)
    with pytest.warns(RuntimeWarning, match="failed in the backward pass") as caught:
        grads = torch.autograd.grad((out * weight).sum(), params)
    assert len([w for w in caught if "FlexAttention" in str(w.message)]) == 1
    expected = torch.autograd.grad((dense * weight).sum(), params)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    stats = flex_stats()
    assert stats["failed"] and stats["fallbacks"] == 2 and "fake backward failure" in stats["last_error"], stats
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        later = two_layers("flex")  # sticky: dense from now on, silently
    torch.testing.assert_close(later, dense, atol=1e-6, rtol=1e-6)
    assert flex_stats()["fallbacks"] == 4


def test_warns_once_when_compilations_reach_dynamos_recompile_limit(monkeypatch):
    limit = torch._dynamo.config.recompile_limit if hasattr(torch._dynamo.config, "recompile_limit") else 8
    monkeypatch.setitem(attention_cropa._FLEX_STATS, "compilations", limit)
    with pytest.warns(RuntimeWarning, match=f"compiled {limit} graphs, dynamo's recompile limit"):
        attention_cropa._warn_at_recompile_limit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention_cropa._warn_at_recompile_limit()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled FlexAttention backward needs CUDA")
def test_compiled_flex_forward_and_backward_match_dense_on_cuda():
    """Student steps (gradients, varying visible slots) and teacher steps (no grad, full grid) on CUDA."""
    heads, head_dim = 4, 48  # the shipped 192/4 geometry
    worst_out = worst_grad = grad_scale = 0.0
    for step, n_slots in enumerate(visible_counts(12)):
        qkv = packed_qkv(n_slots, heads, head_dim, seed=step, device="cuda").requires_grad_()
        grid = CroPAGrid(N_LEADS, n_slots)
        weight = torch.randn(2, grid.n_tokens, heads * head_dim, device="cuda")
        results = {}
        for backend in ("flex", "dense"):
            out = cropa_attention(qkv, heads, grid, backend)
            (grad,) = torch.autograd.grad((out * weight).sum(), qkv)
            results[backend] = (out.detach(), grad)
        worst_out = max(worst_out, float((results["flex"][0] - results["dense"][0]).abs().max()))
        worst_grad = max(worst_grad, float((results["flex"][1] - results["dense"][1]).abs().max()))
        grad_scale = max(grad_scale, float(results["dense"][1].abs().max()))
    student = flex_stats()
    assert student["fallbacks"] == 0 and not student["failed"], student
    assert 1 <= student["compilations"] <= 2, student
    assert worst_out < 1e-4 and worst_grad < 1e-4 * max(1.0, grad_scale), (worst_out, worst_grad, grad_scale)
    reset_flex_stats()
    with torch.no_grad():
        for step in range(3):
            qkv = packed_qkv(50, heads, head_dim, seed=100 + step, device="cuda")
            flex = cropa_attention(qkv, heads, CroPAGrid(N_LEADS, 50), "flex")
            dense = cropa_attention(qkv, heads, CroPAGrid(N_LEADS, 50), "dense")
            torch.testing.assert_close(flex, dense, atol=1e-4, rtol=1e-4)
    teacher = flex_stats()
    assert teacher["fallbacks"] == 0 and teacher["compilations"] <= 1, teacher
