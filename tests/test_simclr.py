"""SimCLR objective: views, loss = NT-Xent of projected embeddings, training lowers the loss."""

from __future__ import annotations

import pytest
import torch

import ssl4ecg_simclr
from ssl4ecg import augment
from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import STANDARD_LEADS, Batch, SignalSpec, StepInfo
from ssl4ecg.nn import resnet1d
from ssl4ecg.nn.losses import nt_xent
from ssl4ecg.registry import Registry

SPEC = SignalSpec(STANDARD_LEADS, 100.0, 250)


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    augment.register(reg)
    resnet1d.register(reg)
    ssl4ecg_simclr.ssl4ecg_register(reg)
    return reg


def build(registry, spec=SPEC, **options):
    torch.manual_seed(0)
    encoder = registry.build("encoder", "resnet1d", {"width": 8}, section="encoder", spec=spec)
    return registry.build("objective", "simclr", options, section="objective", spec=spec, encoder=encoder,
                          registry=registry)


def batch(n: int = 8, spec=SPEC) -> Batch:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, spec.n_leads, spec.n_samples, generator=g)
    return Batch(x, spec.leads, spec.sampling_rate, record_ids=[str(i) for i in range(n)])


def step(seed: int = 0, i: int = 0) -> StepInfo:
    return StepInfo(step=i, total_steps=100, epoch=0, generator=torch.Generator().manual_seed(seed))


def test_default_augmentations_follow_the_sampling_rate(registry):
    names_100 = [type(a).__name__ for a in build(registry).augment.augmentations]
    spec500 = SignalSpec(STANDARD_LEADS, 500.0, 1000)
    names_500 = [type(a).__name__ for a in build(registry, spec=spec500).augment.augmentations]
    assert "PowerlineNoise" not in names_100 and "PowerlineNoise" in names_500
    assert len(names_500) == 7


def test_views_are_two_different_deterministic_augmentations(registry):
    obj = build(registry)
    b = batch()
    v1, v2 = obj.views(b, step(3))
    assert v1.shape == v2.shape == b.signal.shape
    assert not torch.equal(v1, v2) and not torch.equal(v1, b.signal)
    w1, w2 = obj.views(b, step(3))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)


def test_loss_is_nt_xent_of_projected_embeddings(registry):
    obj = build(registry, temperature=0.2, proj_dim=16)
    b = batch()
    out = obj.loss(b, step(1))
    v1, v2 = obj.views(b, step(1))
    z = obj.head(obj.encoder.embed(torch.cat([v1, v2])))
    assert out.loss.item() == pytest.approx(nt_xent(z[:8], z[8:], 0.2).item(), rel=1e-5)
    assert out.representation.shape == (8, obj.encoder.embed_dim) and not out.representation.requires_grad
    assert -1.0 <= out.logs["pos_cos"] <= 1.0


def test_explicit_augmentations_and_no_head(registry):
    obj = build(registry, augmentations=[{"name": "gaussian_noise", "p": 1.0, "std": 0.1}], proj_layers=0)
    assert len(obj.augment) == 1 and isinstance(obj.head, torch.nn.Identity)
    assert torch.isfinite(obj.loss(batch(), step()).loss)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"augmentations": []}, "augmentations is empty"),
        ({"augmentations": [{"name": "gaussian_noise", "sdt": 0.1}]},
         r"\[objective\.augmentations\[0\]\] unknown key 'sdt'.*Did you mean 'std'"),
        ({"augmentations": [{"name": "powerline_noise"}]}, "Nyquist"),
        ({"temprature": 0.1}, r"unknown key 'temprature'.*Did you mean 'temperature'"),
    ],
)
def test_bad_options_are_config_errors(registry, options, message):
    with pytest.raises(ConfigError, match=message):
        build(registry, **options)


def test_twenty_adam_steps_lower_the_loss(registry):
    """Fixed input and fixed views (same generator seed every step): the loss must fall."""
    obj = build(registry, proj_dim=16)
    obj.train()
    opt = torch.optim.Adam(obj.parameters(), lr=1e-3)
    b = batch(n=16)
    losses = []
    for i in range(20):
        out = obj.loss(b, step(seed=0, i=i))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.2 * losses[0], losses


def test_views_draw_from_the_device_generator(registry):
    """Augmentation noise comes from ``StepInfo.device_generator``; the host generator is untouched."""
    obj = build(registry)
    b = batch()
    host = torch.Generator().manual_seed(0)
    state = host.get_state()
    info = StepInfo(step=0, total_steps=100, epoch=0, generator=host, device_generator=torch.Generator().manual_seed(3))
    v1, v2 = obj.views(b, info)
    assert torch.equal(host.get_state(), state)
    w1, w2 = obj.views(b, step(3))  # one generator seeded 3 serving both roles: the same views
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
