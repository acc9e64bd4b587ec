"""Shared transformer blocks, sin-cos embeddings and EMA helpers (ssl4ecg.nn)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssl4ecg.nn.ema import ema_update_, linear_momentum
from ssl4ecg.nn.posembed import sincos_1d, sincos_2d, sincos_2d_time_only
from ssl4ecg.nn.transformer import (
    Attention,
    Block,
    DropPath,
    Mlp,
    drop_path_rates,
    init_transformer_weights_,
    rescale_residual_branches_,
)


def naive_attention(attn: Attention, x: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Attention written out head by head from the documented channel layout."""
    batch, n, dim = x.shape
    heads, dh = attn.num_heads, dim // attn.num_heads
    w = attn.qkv.weight
    q_all, k_all, v_all = x @ w[:dim].T, x @ w[dim:2 * dim].T, x @ w[2 * dim:].T
    outs = []
    for j in range(heads):
        cols = slice(j * dh, (j + 1) * dh)
        logits = q_all[..., cols] @ k_all[..., cols].transpose(1, 2) / math.sqrt(dh)
        if allowed is not None:
            logits = logits.masked_fill(~allowed.expand(batch, -1, -1), float("-inf"))
        outs.append(logits.softmax(dim=-1) @ v_all[..., cols])
    return torch.cat(outs, dim=-1) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_equals_hand_written_softmax_attention(with_mask):
    torch.manual_seed(0)
    attn = Attention(dim=12, num_heads=3)
    nn.init.normal_(attn.proj.bias)
    x = torch.randn(2, 5, 12)
    allowed = None
    if with_mask:
        allowed = torch.rand(5, 5) > 0.5
        allowed |= torch.eye(5, dtype=torch.bool)  # every query keeps at least itself
    expected = naive_attention(attn, x, allowed)
    got = attn(x, None if allowed is None else allowed)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_attention_mask_blocks_information_flow():
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2)
    allowed = torch.eye(4, dtype=torch.bool)  # every token sees only itself
    x = torch.randn(1, 4, 8)
    y = x.clone()
    y[0, 3] += 5.0
    out_x, out_y = attn(x, allowed), attn(y, allowed)
    torch.testing.assert_close(out_x[0, :3], out_y[0, :3])
    assert not torch.allclose(out_x[0, 3], out_y[0, 3])


def test_attention_per_sample_mask_broadcasts_over_heads():
    torch.manual_seed(1)
    attn = Attention(dim=8, num_heads=2)
    x = torch.randn(2, 4, 8)
    masks = torch.rand(2, 4, 4) > 0.4
    masks |= torch.eye(4, dtype=torch.bool)
    got = attn(x, masks[:, None])  # [B, 1, N, N]
    for b in range(2):
        torch.testing.assert_close(got[b], naive_attention(attn, x[b:b + 1], masks[b])[0], atol=1e-5, rtol=1e-5)


def test_qkv_bias_option_and_width_check():
    assert Attention(8, 2, qkv_bias=True).qkv.bias is not None
    assert Attention(8, 2).qkv.bias is None
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, 3)


def test_mlp_uses_exact_erf_gelu():
    torch.manual_seed(0)
    mlp = Mlp(4, 16)
    x = torch.randn(3, 4)
    h = mlp.fc1(x)
    expected = mlp.fc2(0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0))))
    torch.testing.assert_close(mlp(x), expected)
    tanh_gelu = mlp.fc2(nn.functional.gelu(h, approximate="tanh"))
    assert not torch.equal(mlp(x), tanh_gelu)


def test_block_is_pre_norm_residual():
    torch.manual_seed(0)
    block = Block(8, 2, mlp_ratio=2.0, norm_eps=1e-6)
    assert block.norm1.eps == 1e-6 and block.mlp.fc1.out_features == 16
    x = torch.randn(2, 3, 8)
    allowed = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    u = x + naive_attention(block.attn, block.norm1(x), allowed)
    expected = u + block.mlp(block.norm2(u))
    torch.testing.assert_close(block(x, allowed), expected, atol=1e-5, rtol=1e-5)


def test_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    drop = DropPath(0.5)
    x = torch.ones(400, 3, 2)
    out = drop.train()(x)
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()  # a sample is dropped entirely or kept entirely
    assert 0.35 < (per_sample[:, 0] == 0).float().mean() < 0.65
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)
    with pytest.raises(ValueError):
        DropPath(1.0)


def test_drop_path_rates_match_linspace():
    assert drop_path_rates(0.1, 12) == pytest.approx(torch.linspace(0, 0.1, 12).tolist())
    assert drop_path_rates(0.3, 1) == [0.0]
    assert drop_path_rates(0.0, 3) == [0.0, 0.0, 0.0]


def test_init_and_residual_rescale():
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block(64, 4, qkv_bias=True) for _ in range(3))
    init_transformer_weights_(blocks)
    for block in blocks:
        assert torch.equal(block.norm1.weight, torch.ones(64)) and torch.equal(block.norm2.bias, torch.zeros(64))
        assert torch.equal(block.attn.qkv.bias, torch.zeros(192))
        assert block.mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    before = [(b.attn.proj.weight.clone(), b.mlp.fc2.weight.clone(), b.attn.qkv.weight.clone()) for b in blocks]
    rescale_residual_branches_(blocks)
    for layer_id, (block, (proj, fc2, qkv)) in enumerate(zip(blocks, before), start=1):
        scale = 1.0 / math.sqrt(2.0 * layer_id)
        torch.testing.assert_close(block.attn.proj.weight, proj * scale)
        torch.testing.assert_close(block.mlp.fc2.weight, fc2 * scale)
        assert torch.equal(block.attn.qkv.weight, qkv)


# ------------------------------------------------------------------ sin-cos embeddings
def test_sincos_1d_hand_values():
    table = sincos_1d([0, 1, 3], 4)  # w = [1, 10000**-0.5 = 0.01]
    assert table.dtype == torch.float32 and table.shape == (3, 4)
    expected = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],
            [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)],
            [math.sin(3), math.sin(0.03), math.cos(3), math.cos(0.03)],
        ]
    )
    torch.testing.assert_close(table, expected)


def test_sincos_1d_frequencies_and_float64_precision():
    dim, pos = 768, 1234
    k = torch.arange(dim // 2, dtype=torch.float64)
    angle = pos * 10000.0 ** (-k / (dim // 2))
    expected = torch.cat([angle.sin(), angle.cos()]).float()
    assert torch.equal(sincos_1d([pos], dim)[0], expected)
    with pytest.raises(ValueError):
        sincos_1d([0], 5)


def test_sincos_2d_layout_time_first_then_lead():
    dim = 8  # each quarter has w = [1, 0.01]
    table = sincos_2d(range(3), range(4), dim)
    assert table.shape == (12, 8)
    lead, slot = 2, 3
    row = table[lead * 4 + slot]  # lead-major
    expected = torch.tensor(
        [
            math.sin(slot), math.sin(0.01 * slot), math.cos(slot), math.cos(0.01 * slot),
            math.sin(lead), math.sin(0.01 * lead), math.cos(lead), math.cos(0.01 * lead),
        ]
    )
    torch.testing.assert_close(row, expected)
    assert torch.equal(table[:, :4].view(3, 4, 4)[0], sincos_1d(range(4), 4))  # time half, any lead
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(range(2), range(2), 6)


def test_sincos_2d_accepts_lead_subsets():
    full = sincos_2d(range(8), range(5), 16).view(8, 5, 16)
    subset = sincos_2d([6, 1], range(5), 16).view(2, 5, 16)
    assert torch.equal(subset[0], full[6]) and torch.equal(subset[1], full[1])


def test_sincos_time_only_is_lead_zero_row():
    table = sincos_2d_time_only(range(6), 16)
    assert table.shape == (6, 16)
    assert torch.equal(table[:, :8], sincos_1d(range(6), 8))
    assert torch.equal(table[:, 8:12], torch.zeros(6, 4)) and torch.equal(table[:, 12:], torch.ones(6, 4))


# ------------------------------------------------------------------ EMA
def _pair():
    target = nn.BatchNorm1d(2)
    source = nn.BatchNorm1d(2)
    with torch.no_grad():
        target.weight.fill_(1.0)
        target.bias.fill_(-2.0)
        source.weight.fill_(3.0)
        source.bias.fill_(2.0)
        source.running_mean.fill_(7.0)
    return target, source


def test_ema_update_hand_values_and_buffers():
    target, source = _pair()
    ema_update_(target, source, 0.75)
    torch.testing.assert_close(target.weight, torch.full((2,), 0.75 * 1 + 0.25 * 3))
    torch.testing.assert_close(target.bias, torch.full((2,), 0.75 * -2 + 0.25 * 2))
    assert torch.equal(target.running_mean, torch.full((2,), 7.0))  # buffers are copied
    assert torch.equal(source.weight, torch.full((2,), 3.0))  # the source is untouched
    assert target.weight.grad_fn is None


def test_ema_update_extremes_and_errors():
    target, source = _pair()
    ema_update_(target, source, 1.0)
    assert torch.equal(target.weight, torch.ones(2))
    ema_update_(target, source, 0.0)
    assert torch.equal(target.weight, source.weight)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(target, source, 1.5)
    with pytest.raises(ValueError, match="differ"):
        ema_update_(nn.Linear(2, 2), nn.Linear(2, 2, bias=False), 0.9)
    with pytest.raises(ValueError, match="shape"):
        ema_update_(nn.Linear(2, 2), nn.Linear(3, 2), 0.9)


def test_linear_momentum_schedule():
    assert linear_momentum(0.996, 1.0, 0.0) == 0.996
    assert linear_momentum(0.996, 1.0, 1.0) == 1.0
    assert linear_momentum(0.9, 1.0, 0.5) == pytest.approx(0.95)
    assert linear_momentum(0.9, 1.0, 3.0) == 1.0 and linear_momentum(0.9, 1.0, -1.0) == 0.9
