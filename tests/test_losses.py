"""NT-Xent, InfoNCE and the projection head against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl4ecg.nn.heads import ProjectionHead
from ssl4ecg.nn.losses import info_nce, info_nce_from_logits, nt_xent


def nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR's loss written out term by term (double precision)."""
    z = torch.cat([z1, z2]).double()
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        sims = [float(F.cosine_similarity(z[i], z[k], dim=0)) / t for k in range(2 * n)]
        denom = sum(math.exp(sims[k]) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(sims[partner]) / denom)
    return total / (2 * n)


def info_nce_loop(q, k, pos, t, exclude=None, reduction="pairs", normalize=True) -> float:
    q, k = q.double(), k.double()
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    terms_by_row = []
    for i in range(q.shape[0]):
        logits = [float(q[i] @ k[j]) / t for j in range(k.shape[0])]
        allowed = [j for j in range(k.shape[0]) if exclude is None or not exclude[i, j]]
        denom = sum(math.exp(logits[j]) for j in allowed)
        terms = [-(logits[j] - math.log(denom)) for j in range(k.shape[0]) if pos[i, j]]
        if terms:
            terms_by_row.append(terms)
    if reduction == "pairs":
        flat = [x for row in terms_by_row for x in row]
        return sum(flat) / len(flat)
    return sum(sum(r) / len(r) for r in terms_by_row) / len(terms_by_row)


def test_nt_xent_hand_computed():
    # orthogonal unit vectors, both views identical: each anchor sees cos 1 with its partner
    # and cos 0 with the two other projections -> -log(e^{1/t} / (e^{1/t} + 2))
    e = torch.eye(2)
    t = 0.5
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 2.0))
    assert nt_xent(e, e.clone(), t).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_matches_loop_and_uses_2n_minus_2_negatives():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for t in (0.1, 0.5, 1.0):
        assert nt_xent(z1, z2, t).item() == pytest.approx(nt_xent_loop(z1, z2, t), rel=1e-5)
    # invariant to the scale of the projections (cosine similarity)
    assert nt_xent(3 * z1, 0.5 * z2, 0.1).item() == pytest.approx(nt_xent(z1, z2, 0.1).item(), rel=1e-5)
    # symmetric in the views
    assert nt_xent(z2, z1, 0.1).item() == pytest.approx(nt_xent(z1, z2, 0.1).item(), rel=1e-6)


def test_nt_xent_perfect_alignment_lower_than_random():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(16, 32, generator=g)
    aligned = nt_xent(z, z + 0.01 * torch.randn(16, 32, generator=g), 0.1)
    assert aligned < nt_xent(z, torch.randn(16, 32, generator=g), 0.1)


def test_nt_xent_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="both be"):
        nt_xent(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(4, 3), torch.randn(4, 3), 0.0)


@pytest.mark.parametrize("reduction", ["pairs", "rows"])
def test_info_nce_multi_positive_matches_loop(reduction):
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(4, 3, generator=g), torch.randn(6, 3, generator=g)
    pos = torch.tensor(
        [[1, 0, 1, 0, 0, 0],
         [0, 1, 0, 0, 0, 0],
         [0, 0, 0, 0, 0, 0],  # a row without positive is skipped
         [1, 1, 0, 1, 0, 0]],
        dtype=torch.bool,
    )
    exclude = torch.zeros(4, 6, dtype=torch.bool)
    exclude[1, 5] = True
    exclude[3, 4] = True
    got = info_nce(q, k, pos, 0.2, exclude=exclude, reduction=reduction).item()
    assert got == pytest.approx(info_nce_loop(q, k, pos, 0.2, exclude, reduction), rel=1e-5)
    got_dot = info_nce(q, k, pos, 0.7, normalize=False, reduction=reduction).item()
    assert got_dot == pytest.approx(info_nce_loop(q, k, pos, 0.7, None, reduction, normalize=False), rel=1e-5)
    # the two reductions differ when rows have different numbers of positives
    other = "rows" if reduction == "pairs" else "pairs"
    assert got != pytest.approx(info_nce(q, k, pos, 0.2, exclude=exclude, reduction=other).item(), rel=1e-3)


def test_info_nce_single_positive_is_cross_entropy():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 5, generator=g)
    eye = torch.eye(5, dtype=torch.bool)
    assert info_nce_from_logits(logits, eye).item() == pytest.approx(
        F.cross_entropy(logits, torch.arange(5)).item(), rel=1e-6
    )


def test_info_nce_hand_computed_two_positives():
    logits = torch.tensor([[2.0, 0.0, 1.0]])
    pos = torch.tensor([[True, False, True]])
    log_z = math.log(math.exp(2) + 1 + math.exp(1))
    expected = ((log_z - 2) + (log_z - 1)) / 2
    assert info_nce_from_logits(logits, pos).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_runs_in_float32_and_propagates_gradients():
    q = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    loss = info_nce(q, q.detach().float(), torch.eye(4, dtype=torch.bool))
    assert loss.dtype == torch.float32
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad.float()).all()


def test_info_nce_bad_input():
    logits = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="no positive pair"):
        info_nce_from_logits(logits, torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="both a positive and excluded"):
        info_nce_from_logits(logits, torch.eye(2, dtype=torch.bool), exclude=torch.eye(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        info_nce_from_logits(logits, torch.eye(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction"):
        info_nce_from_logits(logits, torch.eye(2, dtype=torch.bool), reduction="sum")
    with pytest.raises(ValueError, match="temperature"):
        info_nce(torch.randn(2, 3), torch.randn(2, 3), torch.eye(2, dtype=torch.bool), temperature=-1)


def _paired(n: int = 32, d: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy pairs: a loss of order 1, where bf16 logits are off by far more than 1e-4."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g)
    return z1, z1 + 3.0 * torch.randn(n, d, generator=g)


def _spy_cross_entropy(monkeypatch) -> list[torch.dtype]:
    """Record the dtype of the logits every ``F.cross_entropy`` call receives."""
    seen: list[torch.dtype] = []
    original = F.cross_entropy

    def spy(logits, *args, **kwargs):
        seen.append(logits.dtype)
        return original(logits, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)
    return seen


def test_autocast_recasts_float32_matmuls_to_bf16():
    """Why the losses switch autocast off: ``.float()`` alone does not keep a matmul in float32."""
    z1, z2 = _paired()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (z1.float() @ z2.float().t()).dtype == torch.bfloat16


def test_nt_xent_logits_are_float32_under_bf16_autocast(monkeypatch):
    z1, z2 = _paired()
    exact = nt_xent(z1, z2, 0.1)
    # the loss from a bf16 similarity matmul, what autocast made of it before
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lossy_logits = (z @ z.t()).float() / 0.1
    n = z1.shape[0]
    lossy = F.cross_entropy(lossy_logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf")),
                            torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))
    assert abs(lossy.item() / exact.item() - 1) > 1e-4
    seen = _spy_cross_entropy(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nt_xent(z1, z2, 0.1)
    assert seen == [torch.float32]
    assert got.dtype == torch.float32 and torch.equal(got, exact)


@pytest.mark.parametrize("multi", [False, True])
def test_info_nce_logits_are_float32_under_bf16_autocast(monkeypatch, multi):
    q, k = _paired(seed=1)
    pos = torch.eye(q.shape[0], dtype=torch.bool)
    if multi:
        pos[0, 1] = pos[3, 7] = True  # some rows with two positives: the log_softmax path
    exact = info_nce(q, k, pos, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lossy_logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t()
    assert lossy_logits.dtype == torch.bfloat16
    lossy = info_nce_from_logits(lossy_logits.float() / 0.1, pos)
    assert abs(lossy.item() / exact.item() - 1) > 1e-4
    seen = _spy_cross_entropy(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = info_nce(q, k, pos, 0.1)
    assert seen == ([] if multi else [torch.float32])
    assert got.dtype == torch.float32 and torch.equal(got, exact)


def test_info_nce_checks_a_cpu_mask_and_scores_on_the_logits_device():
    """A CPU mask with logits elsewhere is checked on the CPU and copied (here: the meta device)."""
    logits = torch.zeros(3, 3, device="meta")
    pos = torch.eye(3, dtype=torch.bool)
    pos[0, 1] = True
    for mask in (torch.eye(3, dtype=torch.bool), pos):
        loss = info_nce_from_logits(logits, mask)
        assert loss.device.type == "meta" and loss.dtype == torch.float32
    with pytest.raises(ValueError, match="no positive pair"):
        info_nce_from_logits(logits, torch.zeros(3, 3, dtype=torch.bool))


def test_projection_head_layers_and_shapes():
    head = ProjectionHead(32, out_dim=16, num_layers=3)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 32), (32, 32), (32, 16)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == 2
    assert head(torch.randn(5, 32)).shape == (5, 16)
    single = ProjectionHead(32, out_dim=8, num_layers=1)
    assert [type(m) for m in single.net] == [nn.Linear]
    no_bn = ProjectionHead(32, out_dim=8, hidden_dim=64, num_layers=2, batch_norm=False, last_bn=True)
    assert [type(m) for m in no_bn.net] == [nn.Linear, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert no_bn.net[0].out_features == 64 and no_bn.net[0].bias is not None
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(8, num_layers=0)
