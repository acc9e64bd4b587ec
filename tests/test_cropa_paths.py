"""Cross-Pattern Attention paths: the factorised and FlexAttention paths equal the dense masked one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl4ecg.interfaces import Batch, SignalSpec, StepInfo
from ssl4ecg.nn import attention_cropa
from ssl4ecg.nn.attention_cropa import (
    CroPAGrid,
    blockwise_attention,
    cropa_attention,
    cropa_mask,
    flex_available,
    packed_sdpa,
    resolve_backend,
    use_backend,
)
from ssl4ecg.nn.transformer import Attention, Block

from ssl4ecg_jepa import CroPAViT, JEPAObjective, RandomSlotMasker

GRIDS = [(4, 5), (1, 6), (3, 1), (8, 12)]  # (leads, slots), including one lead and one slot


def packed(batch: int, grid: tuple[int, int], heads: int, head_dim: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    n_tokens = grid[0] * grid[1]
    return torch.randn(batch, n_tokens, 3 * heads * head_dim, generator=generator, dtype=dtype)


def reference(qkv: torch.Tensor, heads: int, allowed: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention written out with an explicit [N, N] mask."""
    batch, n_tokens, width = qkv.shape
    dim = width // 3
    q, k, v = qkv.view(batch, n_tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * (dim // heads) ** -0.5
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, n_tokens, dim)


@pytest.mark.parametrize("grid", GRIDS)
def test_factorised_equals_dense_masked_forward_and_gradients(grid):
    qkv = packed(2, grid, heads=3, head_dim=8).requires_grad_()
    weight = torch.randn(2, grid[0] * grid[1], 24)
    results = {}
    for backend in ("dense", "factorised"):
        out = cropa_attention(qkv, 3, CroPAGrid(*grid), backend=backend)
        (grad,) = torch.autograd.grad((out * weight).sum(), qkv)
        results[backend] = (out, grad)
    torch.testing.assert_close(results["factorised"][0], results["dense"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["factorised"][1], results["dense"][1], atol=1e-5, rtol=1e-5)
    expected = reference(qkv.detach(), 3, cropa_mask(*grid))
    torch.testing.assert_close(results["factorised"][0].detach(), expected, atol=1e-5, rtol=1e-5)


def test_factorised_gradcheck_float64():
    qkv = packed(1, (3, 4), heads=2, head_dim=3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: cropa_attention(t, 2, CroPAGrid(3, 4), "factorised"), (qkv,))


def test_factorised_at_the_jepa_geometry_matches_dense():
    qkv = packed(1, (8, 50), heads=2, head_dim=8)
    dense = cropa_attention(qkv, 2, CroPAGrid(8, 50), "dense")
    torch.testing.assert_close(cropa_attention(qkv, 2, CroPAGrid(8, 50), "factorised"), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_blocks", [1, 3])
def test_blockwise_attention_equals_block_diagonal_sdpa(n_blocks):
    qkv = packed(2, (n_blocks, 5), heads=2, head_dim=4).requires_grad_()
    block = torch.arange(n_blocks * 5) // 5
    allowed = block[:, None] == block[None, :]
    got = blockwise_attention(qkv, 2, n_blocks)
    expected = packed_sdpa(qkv, 2, None if n_blocks == 1 else allowed)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    weight = torch.randn_like(got)
    (g_got,) = torch.autograd.grad((got * weight).sum(), qkv)
    (g_exp,) = torch.autograd.grad((expected * weight).sum(), qkv)
    torch.testing.assert_close(g_got, g_exp, atol=1e-5, rtol=1e-5)


def test_bf16_inputs_give_bf16_outputs_close_to_float32():
    qkv = packed(2, (8, 10), heads=4, head_dim=16)
    exact = cropa_attention(qkv, 4, CroPAGrid(8, 10), "dense")
    low = qkv.to(torch.bfloat16).requires_grad_()
    out = cropa_attention(low, 4, CroPAGrid(8, 10), "factorised")
    assert out.dtype == torch.bfloat16
    assert float((out.detach().float() - exact).abs().max()) < 0.05
    out.float().sum().backward()
    assert low.grad.dtype == torch.bfloat16 and torch.isfinite(low.grad.float()).all()


def test_auto_backend_choice_and_errors():
    long_fp32 = torch.zeros(1, 400, 12, requires_grad=True)
    assert resolve_backend("auto", long_fp32) == "factorised"
    assert resolve_backend("auto", torch.zeros(1, 32, 12, requires_grad=True)) == "dense"  # short
    with torch.no_grad():
        assert resolve_backend("auto", long_fp32) == "factorised"
        assert resolve_backend("auto", long_fp32.detach().bfloat16()) == "dense"  # bf16 teacher
    assert resolve_backend("dense", long_fp32) == "dense"
    with pytest.raises(ValueError, match="unknown CroPA backend"):
        resolve_backend("sparse", long_fp32)
    with pytest.raises(ValueError, match="grid 3 x 2"):
        cropa_attention(torch.zeros(1, 5, 12), 2, CroPAGrid(3, 2))


def test_dense_mask_is_built_once_per_geometry():
    grid = CroPAGrid(4, 7)
    assert grid.dense_mask("cpu") is CroPAGrid(4, 7).dense_mask(torch.device("cpu"))
    assert torch.equal(grid.dense_mask(), cropa_mask(4, 7))


@pytest.mark.skipif(not flex_available(), reason="torch.nn.attention.flex_attention is not available")
def test_flex_equals_dense_forward_on_cpu():
    """FlexAttention runs forward-only (unfused) on CPU; this checks its block mask encodes CroPA."""
    qkv = packed(2, (4, 6), heads=2, head_dim=8)
    with torch.no_grad():
        flex = cropa_attention(qkv, 2, CroPAGrid(4, 6), "flex")
        dense = cropa_attention(qkv, 2, CroPAGrid(4, 6), "dense")
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled FlexAttention path needs CUDA")
@pytest.mark.skipif(not flex_available(), reason="torch.nn.attention.flex_attention is not available")
def test_flex_equals_dense_with_gradients_on_cuda():
    qkv = packed(2, (8, 16), heads=2, head_dim=16).cuda().requires_grad_()
    results = {}
    for backend in ("flex", "dense"):
        out = cropa_attention(qkv, 2, CroPAGrid(8, 16), backend)
        (grad,) = torch.autograd.grad(out.square().sum(), qkv)
        results[backend] = (out, grad)
    torch.testing.assert_close(results["flex"][0], results["dense"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results["flex"][1], results["dense"][1], atol=1e-4, rtol=1e-4)


def test_attention_and_block_accept_a_grid_in_place_of_the_mask():
    torch.manual_seed(0)
    attn = Attention(dim=16, num_heads=2)
    block = Block(dim=16, num_heads=2)
    x = torch.randn(2, 12, 16)
    mask = cropa_mask(3, 4)
    torch.testing.assert_close(attn(x, CroPAGrid(3, 4)), attn(x, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block(x, CroPAGrid(3, 4)), block(x, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_tokens", [10, 200])  # blockwise path / float32 SDPA path
def test_sdpa_under_bf16_autocast_with_gradients_matches_float32(n_tokens):
    torch.manual_seed(0)
    attn = Attention(dim=16, num_heads=2)
    x = torch.randn(2, n_tokens, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attn(x)
    assert low.dtype == torch.bfloat16
    low.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert float((low.detach().float() - attn(x).detach()).abs().max()) < 0.05


# ---------------------------------------------------------------------- inside ECG-JEPA
SPEC = SignalSpec(leads=("I", "II", "V1", "V2"), sampling_rate=100.0, n_samples=200)


@pytest.mark.parametrize("backend", ["factorised", "dense"])
def test_jepa_steps_never_build_a_mask_per_sample(backend):
    """Factorised: no [N, N] mask at all; dense: one cached mask per grid geometry, whatever the batch."""
    torch.manual_seed(0)
    masker = RandomSlotMasker(ratio_min=0.5, ratio_max=0.5, per_sample=True)  # 4 of 8 slots, per sample
    objective = JEPAObjective(CroPAViT(SPEC, dim=32, depth=2, heads=4, patch_size=25, drop_path=0.0),
                              masker, predictor_dim=16, predictor_depth=1, predictor_heads=2)
    attention_cropa._cached_mask.cache_clear()
    generator = torch.Generator().manual_seed(0)
    with use_backend(backend):
        for step, batch_size in enumerate((3, 5, 3)):
            batch = Batch(signal=torch.randn(batch_size, 4, 200), leads=SPEC.leads, sampling_rate=100.0)
            objective.loss(batch, StepInfo(step=step, total_steps=10, epoch=0, generator=generator)).loss.backward()
    built = attention_cropa._cached_mask.cache_info().currsize
    assert built == (0 if backend == "factorised" else 2)  # teacher 4 x 8 grid, student 4 x 4 grid


def test_encoder_grid_path_equals_the_dense_mask_path():
    torch.manual_seed(0)
    encoder = CroPAViT(SPEC, dim=32, depth=2, heads=4, patch_size=25, drop_path=0.0).eval()
    x = torch.randn(2, 4, 200)
    tokens = encoder.tokens(x)
    h = encoder.patch_embed(x.reshape(2, 32, 25))
    pos = encoder.pos_embed.reshape(32, 32)
    mask = encoder._attention_mask(4, 8, x.device)
    for block in encoder.blocks:
        h = block(h + pos, mask)
    torch.testing.assert_close(tokens, encoder.norm(h), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "factorised"])
def test_bf16_autocast_loss_curve_tracks_float32(backend):
    """Ten JEPA steps from the same weights and masks: bf16 autocast losses stay near float32."""
    losses = {}
    signal = torch.sin(torch.linspace(0, 60, 200)) * torch.randn(8, 4, 1, generator=torch.Generator().manual_seed(1))
    batch = Batch(signal=signal, leads=SPEC.leads, sampling_rate=100.0)
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        objective = JEPAObjective(CroPAViT(SPEC, dim=32, depth=2, heads=4, patch_size=25, drop_path=0.0),
                                  predictor_dim=16, predictor_depth=1, predictor_heads=2,
                                  ema_start=0.9, ema_end=0.95)
        optimizer = torch.optim.AdamW(objective.parameters(), lr=2e-3)
        generator = torch.Generator().manual_seed(0)
        curve = []
        for step in range(10):
            info = StepInfo(step=step, total_steps=10, epoch=0, generator=generator)
            with use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = objective.loss(batch, info)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            objective.after_step(info)
            curve.append(float(out.loss.detach()))
        losses[precision] = torch.tensor(curve)
    relative = (losses["bf16"] - losses["fp32"]).abs() / losses["fp32"]
    assert float(relative.max()) < 0.03, (losses["fp32"], losses["bf16"])
    assert losses["fp32"][-1] < losses["fp32"][0]


def test_float32_loss_unchanged_by_the_backend():
    """The whole JEPA loss and its gradients agree between the factorised and dense backends."""
    torch.manual_seed(0)
    objective = JEPAObjective(CroPAViT(SPEC, dim=32, depth=2, heads=4, patch_size=25, drop_path=0.0),
                              predictor_dim=16, predictor_depth=1, predictor_heads=2)
    batch = Batch(signal=torch.randn(3, 4, 200), leads=SPEC.leads, sampling_rate=100.0)
    params = [p for p in objective.parameters() if p.requires_grad]
    results = []
    for backend in ("factorised", "dense"):
        with use_backend(backend):
            out = objective.loss(batch, StepInfo(step=0, total_steps=10, epoch=0))
            results.append((out.loss.detach(), torch.autograd.grad(out.loss, params)))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown CroPA backend"), use_backend("sparse"):
        pass


def test_reference_attention_helper_matches_sdpa():
    """Sanity of this file's reference against torch's own SDPA."""
    qkv = packed(1, (2, 3), heads=2, head_dim=4)
    q, k, v = qkv.view(1, 6, 3, 2, 4).permute(2, 0, 3, 1, 4)
    mask = cropa_mask(2, 3)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(1, 6, 8)
    torch.testing.assert_close(reference(qkv, 2, mask), expected, atol=1e-6, rtol=1e-5)
