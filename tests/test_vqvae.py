"""VQ-VAE plugin: quantiser cures on hand-made inputs, decoder layout probe, training, collapse control."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ssl4ecg.data.synthetic import SyntheticSource
from ssl4ecg.interfaces import STANDARD_LEADS, Batch, Encoder, SignalSpec, StepInfo
from ssl4ecg.registry import get_registry
from ssl4ecg_vqvae import QuantizedEncoder, VectorQuantizer, VQVAEObjective, kmeans, perplexity, token_time_map
from ssl4ecg_vqvae.objective import position_perplexity

SPEC = SignalSpec(STANDARD_LEADS, 100.0, 1000)


class ConvTokens(Encoder):
    """Time-major tokens: two strided convolutions (stride 20 -> 50 tokens for 1000 samples).

    ``offset`` adds a fixed shared vector to every token after a LayerNorm, the anisotropy of
    real pretrained encoders (a large common component, small record-to-record differences).
    """

    def __init__(self, spec: SignalSpec, dim: int = 32, offset: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.spec, self.embed_dim = spec, dim
        gen = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Conv1d(spec.n_leads, dim, 7, stride=5, padding=3), nn.GELU(),
                                 nn.Conv1d(dim, dim, 5, stride=4, padding=2))
        for p in self.net.parameters():
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        self.norm = nn.LayerNorm(dim)
        with torch.no_grad():
            self.norm.bias.copy_(torch.randn(dim, generator=gen) * offset / dim ** 0.5)

    def tokens(self, x, leads=None):
        return self.norm(self.net(x).transpose(1, 2))


class PatchTokens(Encoder):
    """Lead-major tokens like ECG-JEPA: every lead cut into patches of 50 samples (L x 20 tokens)."""

    def __init__(self, spec: SignalSpec, dim: int = 16) -> None:
        super().__init__()
        self.spec, self.embed_dim = spec, dim
        self.patch = nn.Linear(50, dim)

    def tokens(self, x, leads=None):
        b, l, t = x.shape
        return self.patch(x.reshape(b, l * (t // 50), 50))


@pytest.fixture(scope="module")
def signals() -> torch.Tensor:
    """Synthetic 12-lead records at 100 Hz, 10 s."""
    rs = SyntheticSource(n_records=256, sampling_rate=100.0, seed=5).load()
    x = np.asarray(rs.signals, dtype=np.float32)
    x = (x - x.mean(axis=2, keepdims=True)) / (x.std(axis=2, keepdims=True) + 1e-6)
    return torch.from_numpy(x)


def _train(obj: VQVAEObjective, x: torch.Tensor, steps: int, lr: float = 2e-3, batch: int = 32, seed: int = 0):
    """Train ``obj`` like the shared loop does (loss, backward, step, after_step); return all logs."""
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    logs = []
    obj.train()
    for s in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        info = StepInfo(step=s, total_steps=steps, epoch=0, generator=gen)
        out = obj.loss(Batch(signal=x[idx], leads=STANDARD_LEADS, sampling_rate=100.0), info)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        obj.after_step(info)
        logs.append(out.logs)
    return logs


# ----------------------------------------------------------------------------- quantiser

def test_kmeans_init_puts_codes_on_the_clusters():
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    gen = torch.Generator().manual_seed(0)
    z = (centers[:, None, :] + 0.1 * torch.randn(4, 50, 2, generator=gen)).reshape(-1, 2)
    vq = VectorQuantizer(4, 2, kmeans_init=True)
    vq.train()
    assert not bool(vq.initialized)
    vq(z, gen)
    assert bool(vq.initialized)
    dist = torch.cdist(centers, vq.codebook)
    assert dist.min(dim=1).values.max() < 0.2  # every cluster has a code on it
    assert set(dist.argmin(dim=1).tolist()) == {0, 1, 2, 3}


def test_kmeans_waits_for_enough_vectors():
    vq = VectorQuantizer(16, 2, kmeans_init=True)
    vq.train()
    gen = torch.Generator().manual_seed(0)
    vq(torch.randn(10, 2, generator=gen), gen)
    assert not bool(vq.initialized)
    vq(torch.randn(10, 2, generator=gen), gen)
    assert bool(vq.initialized)
    c, counts = kmeans(torch.randn(100, 3, generator=gen), 8, 5, gen)
    assert c.shape == (8, 3) and counts.sum() == 100


def test_ema_update_moves_a_code_to_the_running_mean():
    vq = VectorQuantizer(2, 2, ema=True, decay=0.9, kmeans_init=False, restarts=False)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    vq.cluster_size.copy_(torch.tensor([4.0, 4.0]))
    vq.embed_sum.copy_(vq.codebook * 4.0)
    vq.ema_weight.fill_(1.0)
    vq.train()
    z = torch.tensor([[1.0, 0.0], [1.0, 2.0]])  # both nearest to code 0
    out = vq(z)
    assert out.codes.tolist() == [0, 0]
    vq.update(torch.Generator())
    # cluster size 0.9 * 4 + 0.1 * 2 = 3.8; sum 0.9 * 0 + 0.1 * (2, 2) = (0.2, 0.2)
    assert vq.cluster_size[0].item() == pytest.approx(3.8)
    torch.testing.assert_close(vq.codebook[0], torch.tensor([0.2, 0.2]) / 3.8)
    torch.testing.assert_close(vq.codebook[1], torch.tensor([10.0, 10.0]))  # unused: unchanged


def test_dead_codes_are_restarted_from_recent_encoder_outputs():
    vq = VectorQuantizer(4, 2, ema=True, decay=0.5, kmeans_init=False, restarts=True, dead_after=2)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [-100.0, 0.0]]))
    vq.train()
    gen = torch.Generator().manual_seed(0)
    z = 0.1 * torch.randn(64, 2, generator=gen)  # every vector picks code 0
    vq(z, gen)
    assert vq.update(gen) == 0  # unused for one step only: not dead yet
    vq(z, gen)
    restarted = vq.update(gen)
    assert restarted == 3 and vq.last_restarted == 3 and int(vq.restarted_total) == 3
    for row in vq.codebook[1:]:
        assert torch.isclose(z, row[None]).all(dim=1).any(), "a restarted code is not a recent output"
    # the restarted codes take vectors again and are not restarted right away
    out = vq(z, gen)
    assert len(set(out.codes.tolist())) > 1
    assert vq.update(gen) == 0


def test_straight_through_gradient_and_commitment():
    vq = VectorQuantizer(3, 2, kmeans_init=False, ema=True)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]]))
    vq.eval()
    z = torch.tensor([[0.9, 1.2], [0.1, -0.1]], requires_grad=True)
    out = vq(z)
    assert out.codes.tolist() == [1, 0]
    torch.testing.assert_close(out.quantized_st, out.quantized)
    out.quantized_st.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # identity through the bottleneck
    expected = ((z.detach() - out.quantized) ** 2).mean()
    torch.testing.assert_close(out.commitment, expected)


def test_perplexity_measures():
    assert perplexity(torch.tensor([10.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert perplexity(torch.ones(8)) == pytest.approx(8.0)
    same = torch.arange(5).repeat(6, 1)  # every record the same code at a position
    assert position_perplexity(same, 16) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- objective

def test_token_time_map_finds_time_and_lead_major_layouts():
    conv = token_time_map(ConvTokens(SPEC), SPEC, n_segments=10, segment_len=100)
    assert conv.shape == (10, 50)
    torch.testing.assert_close(conv.sum(1), torch.ones(10))
    # segment s (samples 100 s .. 100 s + 99) is seen by tokens 5 s .. 5 s + 4 (+ receptive field)
    centroid = (conv * torch.arange(50.0)).sum(dim=1)
    assert torch.all((centroid - (torch.arange(10) * 5 + 2)).abs() < 1.5), centroid
    for s in range(10):
        inside = slice(max(0, 5 * s - 1), 5 * s + 6)
        assert conv[s, inside].sum() > 0.99
    patch = token_time_map(PatchTokens(SPEC), SPEC, n_segments=20, segment_len=50)
    # segment s of lead l is token l * 20 + s: all weight on the 12 tokens of that time slot
    for s in (0, 7, 19):
        assert patch[s, [l * 20 + s for l in range(12)]].sum() == pytest.approx(1.0, abs=1e-5)


def test_loss_logs_every_step_and_reconstruction_improves(signals):
    torch.manual_seed(0)
    obj = VQVAEObjective(ConvTokens(SPEC), spec=SPEC, codebook_size=64, code_dim=16,
                         decoder_dim=64, usage_window=10, segment_ms=200.0)
    logs = _train(obj, signals, steps=40)
    for entry in logs:
        for key in ("vq_usage", "vq_perplexity", "vq_perplexity_window", "vq_recon", "vq_commit",
                    "vq_perplexity_per_position", "vq_restarted"):
            assert key in entry and np.isfinite(float(entry[key]))
    first = np.mean([e["vq_recon"] for e in logs[:5]])
    last = np.mean([e["vq_recon"] for e in logs[-5:]])
    assert last < 0.9 * first, (first, last)


def test_codebook_stays_used_with_the_cures_and_collapses_without(signals):
    """The negative control: the project report's collapse, reproduced and cured.

    A frozen encoder with the anisotropy of pretrained ones (large shared token component), a
    256-code book: with k-means init + EMA + restarts at least a quarter of the codes are used
    with perplexity > K/8; with all three off a handful of codes take every token.
    """
    k = 256
    results = {}
    for cures in (True, False):
        torch.manual_seed(0)
        obj = VQVAEObjective(ConvTokens(SPEC, offset=100.0), spec=SPEC, codebook_size=k, code_dim=32,
                             kmeans_init=cures, ema=cures, restarts=cures, freeze_encoder=True,
                             decoder_dim=64, usage_window=20)
        logs = _train(obj, signals, steps=40)
        results[cures] = logs[-1]
    on, off = results[True], results[False]
    assert on["vq_usage"] >= 0.25 and on["vq_perplexity_window"] > k / 8, on
    assert off["vq_usage"] < 0.25 and off["vq_perplexity_window"] < k / 8, off


def test_frozen_encoder_is_not_trained_and_stays_in_eval_mode(signals):
    enc = ConvTokens(SPEC)
    before = [p.detach().clone() for p in enc.parameters()]
    obj = VQVAEObjective(enc, spec=SPEC, codebook_size=32, code_dim=8, freeze_encoder=True, decoder_dim=32)
    _train(obj, signals, steps=3)
    assert not enc.training
    for a, b in zip(before, enc.parameters()):
        torch.testing.assert_close(a, b)
    assert all(not p.requires_grad for p in enc.parameters())


def test_registry_builds_vqvae_and_its_representation_encoders(signals):
    reg = get_registry()
    enc = ConvTokens(SPEC)
    obj = reg.build("objective", "vqvae", {"codebook_size": 32, "code_dim": 8, "eval_encoder": "quantized"},
                    "objective", spec=SPEC, encoder=enc)
    assert isinstance(obj, VQVAEObjective)
    _train(obj, signals, steps=2)
    rep = obj.representation_encoder()
    assert isinstance(rep, QuantizedEncoder) and rep.embed_dim == 8
    tokens = rep.tokens(signals[:3])
    assert tokens.shape == (3, 50, 8)
    # quantised tokens are codebook rows
    diff = (tokens.reshape(-1, 1, 8) - obj.quantizer.codebook[None]).abs().amax(dim=2)
    assert diff.min(dim=1).values.max() < 1e-6
    assert reg.build("objective", "vqvae", {}, "objective", spec=SPEC, encoder=enc).representation_encoder() is enc


def test_quantizer_state_survives_a_checkpoint(signals):
    obj = VQVAEObjective(ConvTokens(SPEC), spec=SPEC, codebook_size=32, code_dim=8, decoder_dim=32)
    _train(obj, signals, steps=4)
    copy = VQVAEObjective(ConvTokens(SPEC), spec=SPEC, codebook_size=32, code_dim=8, decoder_dim=32)
    copy.load_state_dict(obj.state_dict())
    for name in ("codebook", "cluster_size", "embed_sum", "hits", "initialized", "ema_weight"):
        torch.testing.assert_close(getattr(copy.quantizer, name), getattr(obj.quantizer, name))
    assert copy.quantizer.usage() == obj.quantizer.usage()


@pytest.mark.slow
def test_codebook_usage_on_real_ptbxl_records(shared_data):
    """Real ptbxl-mini records: usage >= 25 % and perplexity > K/8 after 40 steps."""
    pytest.importorskip("wfdb")
    from ssl4ecg.clinical.compare import load_ptbxl_records

    root = shared_data / "ptbxl-mini"
    if not (root / "ptbxl_database.csv").is_file():
        pytest.skip("ptbxl-mini not found in the shared data folder")
    x, leads, fs = load_ptbxl_records(root, n=256)
    assert tuple(leads) == STANDARD_LEADS and fs == 100.0
    torch.manual_seed(0)
    k = 256
    obj = VQVAEObjective(ConvTokens(SPEC, offset=100.0), spec=SPEC, codebook_size=k, code_dim=32,
                         freeze_encoder=True, decoder_dim=64, usage_window=20)
    logs = _train(obj, torch.from_numpy(x), steps=40)
    assert logs[-1]["vq_usage"] >= 0.25 and logs[-1]["vq_perplexity_window"] > k / 8, logs[-1]
