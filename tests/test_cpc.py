"""CPC: encoder and predictor shapes, causal context, InfoNCE vs a loop, training lowers the loss."""

from __future__ import annotations

import math

import pytest
import torch

import ssl4ecg_cpc
from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import STANDARD_LEADS, Batch, SignalSpec, StepInfo
from ssl4ecg.nn import resnet1d
from ssl4ecg.registry import Registry
from ssl4ecg_cpc import CPCEncoder, random_crops

SPEC = SignalSpec(STANDARD_LEADS, 100.0, 64)
TINY_ENCODER = {"features": [16, 16], "kernel_sizes": [1, 1], "strides": [1, 1], "context_dim": 16,
                "context_layers": 1}


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    resnet1d.register(reg)
    ssl4ecg_cpc.ssl4ecg_register(reg)
    return reg


def build(registry, spec=SPEC, encoder_options=None, **options):
    torch.manual_seed(0)
    enc = registry.build("encoder", "cpc_encoder", {**TINY_ENCODER, **(encoder_options or {})}, section="encoder",
                         spec=spec)
    defaults = {"prediction_steps": 4, "crop_seconds": 0.0}
    return registry.build("objective", "cpc", {**defaults, **options}, section="objective", spec=spec, encoder=enc)


def batch(n: int = 4, spec=SPEC) -> Batch:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, spec.n_leads, spec.n_samples, generator=g)
    return Batch(x, spec.leads, spec.sampling_rate)


def step(seed: int = 0) -> StepInfo:
    return StepInfo(step=0, total_steps=10, epoch=0, generator=torch.Generator().manual_seed(seed))


def test_encoder_default_is_per_sample_and_oord_strides_downsample_160x(registry):
    spec = SignalSpec(STANDARD_LEADS, 100.0, 1600)
    enc = registry.build("encoder", "cpc_encoder", {"features": [8] * 4, "context_dim": 8}, section="encoder",
                         spec=spec)
    assert enc.tokens(torch.randn(2, 12, 250)).shape == (2, 250, 8)  # 1x1 convolutions: one z per sample
    assert isinstance(enc.context_network.rnn, torch.nn.LSTM) and enc.context_network.rnn.num_layers == 2
    oord = CPCEncoder(spec, features=[8] * 5, kernel_sizes=[10, 8, 4, 4, 4], strides=[5, 4, 2, 2, 2],
                      context_dim=6, embed_from="latent").eval()
    assert oord.downsampling == 160
    x = torch.randn(2, 12, 1600)
    assert oord.tokens(x).shape == (2, 10, 8) and oord.contexts(x).shape == (2, 10, 6)
    assert oord.embed_dim == 8 and torch.allclose(oord.embed(x), oord.tokens(x).mean(1), atol=1e-6)


def test_embed_is_mean_of_context_and_predictor_shapes(registry):
    obj = build(registry, encoder_options={"context_dim": 24, "context": "gru"}, prediction_steps=5)
    enc = obj.encoder.eval()
    assert isinstance(enc.context_network.rnn, torch.nn.GRU)
    assert len(obj.predictors) == 5
    assert all(p.in_features == 24 and p.out_features == 16 and p.bias is None for p in obj.predictors)
    x = batch().signal
    assert enc.contexts(x).shape == (4, 64, 24) and enc.embed_dim == 24
    assert torch.allclose(enc.embed(x), enc.contexts(x).mean(dim=1), atol=1e-6)
    assert obj.representation_encoder() is enc  # the saved encoder holds the context network


def test_context_is_causal(registry):
    enc = build(registry).encoder.eval()
    x = batch().signal
    y = x.clone()
    y[..., 40:] += 5.0  # change the future only
    with torch.no_grad():
        c_x, c_y = enc.contexts(x), enc.contexts(y)
    assert torch.allclose(c_x[:, :40], c_y[:, :40], atol=1e-6)
    assert not torch.allclose(c_x[:, 40:], c_y[:, 40:])


def test_all_negatives_loss_matches_a_direct_loop(registry):
    obj = build(registry, num_negatives=0, temperature=0.5).eval()
    b = batch(n=2)
    out = obj.loss(b, step())
    with torch.no_grad():
        z = obj.encoder.tokens(b.signal).double()
        c = obj.encoder.contexts(b.signal).double()
    n_b, n_t, _ = z.shape
    total = 0.0
    for k in range(1, 5):
        w = obj.predictors[k - 1].weight.detach().double()
        terms = []
        for bi in range(n_b):
            for t in range(n_t - k):
                scores = z.reshape(n_b * n_t, -1) @ (w @ c[bi, t]) / 0.5  # every latent of the batch
                terms.append(float(torch.logsumexp(scores, 0) - scores[bi * n_t + t + k]))
        total += sum(terms) / len(terms)
    assert out.loss.item() == pytest.approx(total / 4, rel=1e-4)


def test_sampled_negatives_logits_and_collisions(registry):
    obj = build(registry, num_negatives=50)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 6, 16, generator=g)
    pred = torch.randn(2, 4, 16, generator=g)  # k = 2: predictions from c_0..c_3
    logits, positives = obj.offset_logits(pred, z, 2, torch.Generator().manual_seed(9))
    assert logits.shape == (8, 51) and positives[:, 0].all() and positives[:, 1:].sum() == 0
    # column 0 is z_{t+k} . prediction (temperature 1)
    assert torch.allclose(logits[:, 0], (pred * z[:, 2:]).sum(-1).reshape(-1), atol=1e-5)
    neg_index = torch.randint(0, 12, (50,), generator=torch.Generator().manual_seed(9))
    z_flat = z.reshape(12, 16)
    pos_index = torch.tensor([2, 3, 4, 5, 8, 9, 10, 11])
    collision = neg_index[None, :] == pos_index[:, None]
    assert collision.any()  # 50 draws over 12 positions: some prediction's own positive was drawn
    assert torch.equal(torch.isinf(logits[:, 1:]), collision)  # ...and only those leave the softmax
    expected = pred.reshape(8, 16) @ z_flat[neg_index].t()
    assert torch.allclose(logits[:, 1:][~collision], expected[~collision], atol=1e-5)


def test_loss_logs_and_representation(registry):
    obj = build(registry, num_negatives=20)
    out = obj.loss(batch(), step())
    assert math.isfinite(out.loss.item()) and 0.0 <= out.logs["accuracy"] <= 1.0
    assert out.representation.shape == (4, 16) and not out.representation.requires_grad
    # at random init the loss is near log(1 + negatives) (chance among the candidates)
    assert abs(out.loss.item() - math.log(21)) < 2.0


def test_random_crops_take_windows():
    x = torch.arange(100, dtype=torch.float32).expand(5, 2, 100).clone()
    crops = random_crops(x, 25, torch.Generator().manual_seed(0))
    assert crops.shape == (5, 2, 25)
    assert torch.equal(crops[..., 1:] - crops[..., :-1], torch.ones(5, 2, 24))
    assert crops[:, 0, 0].unique().numel() > 1
    assert random_crops(x, 100, torch.Generator()) is x


def test_crop_seconds_sets_the_training_length(registry):
    obj = build(registry, spec=SignalSpec(STANDARD_LEADS, 100.0, 1000), crop_seconds=0.3)
    assert obj.crop == 30
    b = batch(spec=SignalSpec(STANDARD_LEADS, 100.0, 1000))
    assert torch.isfinite(obj.loss(b, step()).loss)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prediction_steps": 0}, "prediction_steps must be >= 1"),
        ({"crop_seconds": -1.0}, "crop_seconds must be > 0, or 0"),
        ({"num_negatvies": 3}, r"unknown key 'num_negatvies'.*Did you mean 'num_negatives'"),
        ({"context_dim": 8}, r"\[objective\] unknown key 'context_dim'"),  # an encoder option
    ],
)
def test_bad_options_are_config_errors(registry, options, message):
    with pytest.raises(ConfigError, match=message):
        build(registry, **options)


def test_too_few_latent_steps_is_a_config_error(registry):
    obj = build(registry, prediction_steps=12, crop_seconds=0.1)  # 10 samples -> 10 steps
    with pytest.raises(ConfigError, match="crop_seconds or lower prediction_steps"):
        obj.loss(batch(), step())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"features": [8, 8], "strides": [1]}, "same length"),
        ({"context": "transformer"}, "context must be 'lstm' or 'gru'"),
        ({"embed_from": "pooled"}, "embed_from must be 'context' or 'latent'"),
        ({"strides": [1, 0]}, "strides must be positive integers"),
    ],
)
def test_encoder_option_errors(registry, options, message):
    with pytest.raises(ConfigError, match=rf"\[encoder\] cannot build encoder 'cpc_encoder'.*{message}"):
        registry.build("encoder", "cpc_encoder", {**TINY_ENCODER, **options}, section="encoder", spec=SPEC)


def test_cpc_needs_an_encoder_with_a_context_network(registry):
    spec = SignalSpec(STANDARD_LEADS, 100.0, 512)
    enc = registry.build("encoder", "resnet1d", {"width": 4}, section="encoder", spec=spec)
    with pytest.raises(ConfigError, match='needs an encoder with a context network.*name = "cpc_encoder"'):
        registry.build("objective", "cpc", {}, section="objective", spec=spec, encoder=enc)


def test_reduced_leads_reach_the_context(registry):
    enc = build(registry).encoder.eval()
    x = batch().signal
    full = torch.zeros_like(x)
    full[:, 1] = x[:, 1]
    with torch.no_grad():
        assert torch.allclose(enc.embed(x[:, 1:2], leads=("II",)), enc.embed(full), atol=1e-6)


def test_twenty_adam_steps_lower_the_loss(registry):
    obj = build(registry, num_negatives=32)
    obj.train()
    opt = torch.optim.Adam(obj.parameters(), lr=1e-2)
    b = batch(n=8)
    losses = []
    for _ in range(20):
        out = obj.loss(b, step(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert out.logs["accuracy"] > 0.3  # chance among 33 candidates is 0.03


@pytest.mark.parametrize("num_negatives", [0, 20])
def test_offset_logits_are_float32_under_bf16_autocast(registry, num_negatives):
    obj = build(registry, num_negatives=num_negatives, normalize=True, temperature=0.1)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 12, 16, generator=g)
    pred = torch.randn(2, 10, 16, generator=g)  # k = 2
    exact, positives = obj.offset_logits(pred, z, 2, torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_positives = obj.offset_logits(pred, z, 2, torch.Generator().manual_seed(1))
        from_bf16, _ = obj.offset_logits(pred.bfloat16(), z.bfloat16(), 2, torch.Generator().manual_seed(1))
    assert got.dtype == from_bf16.dtype == torch.float32
    assert torch.equal(got, exact) and torch.equal(got_positives, positives)
    # bf16 inputs (what autocast's layers hand over) are scored in float32 too
    expected, _ = obj.offset_logits(pred.bfloat16().float(), z.bfloat16().float(), 2,
                                    torch.Generator().manual_seed(1))
    assert torch.equal(from_bf16, expected)


@pytest.mark.parametrize("context", ["lstm", "gru"])
def test_context_network_runs_in_float32_under_bf16_autocast(registry, context):
    net = build(registry, encoder_options={"context": context}).encoder.context_network
    z = torch.randn(2, 30, 16, generator=torch.Generator().manual_seed(2))
    exact = net(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = net(z)
        from_bf16 = net(z.bfloat16())  # the conv layers' autocast output
    assert got.dtype == from_bf16.dtype == torch.float32
    assert torch.equal(got, exact)
    assert torch.equal(from_bf16, net(z.bfloat16().float()))


def test_cpc_trains_under_bf16_autocast(registry):
    """Under CPU bf16 autocast: float32 loss and gradients for every parameter, and steps lower the loss."""
    obj = build(registry, num_negatives=20).train()
    opt = torch.optim.Adam(obj.parameters(), lr=1e-2)
    b = batch(n=8)
    losses = []
    for i in range(10):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = obj.loss(b, step(0))
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        if i == 0:
            for name, p in obj.named_parameters():
                assert p.grad is not None and p.grad.dtype == torch.float32, name
                assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert isinstance(out.logs["accuracy"], torch.Tensor) and 0.0 <= float(out.logs["accuracy"]) <= 1.0
