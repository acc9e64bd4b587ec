"""The 1-D ResNet encoder: shapes per variant, any length, reduced leads, registry errors."""

from __future__ import annotations

import pytest
import torch

from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import STANDARD_LEADS, SignalSpec
from ssl4ecg.nn import resnet1d
from ssl4ecg.nn.resnet1d import ResNet1d
from ssl4ecg.registry import Registry

SPEC = SignalSpec(STANDARD_LEADS, 100.0, 1000)


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    resnet1d.register(reg)
    return reg


def test_small_shapes_and_embed_is_global_average_pool():
    torch.manual_seed(0)
    enc = ResNet1d(SPEC).eval()
    x = torch.randn(3, 12, 1000)
    tokens = enc.tokens(x)
    # stem stride 2 (1000 -> 500), max-pool (-> 250), three stride-2 stages (-> 125 -> 63 -> 32)
    assert tokens.shape == (3, 32, 256) and enc.embed_dim == 256
    assert torch.allclose(enc.embed(x), tokens.mean(dim=1), atol=1e-6)
    assert enc.tokens(torch.randn(2, 12, 500)).shape == (2, 16, 256)  # shorter segments work


def test_resnet50_is_bottleneck_3_4_6_3_with_2048_channels(registry):
    enc = registry.build("encoder", "resnet1d", {"variant": "resnet50"}, section="encoder", spec=SPEC).eval()
    assert [len(stage) for stage in enc.stages] == [3, 4, 6, 3]
    assert all(isinstance(b, resnet1d.Bottleneck1d) for stage in enc.stages for b in stage)
    assert enc.embed_dim == 2048
    with torch.no_grad():
        assert enc.tokens(torch.randn(2, 12, 256)).shape == (2, 8, 2048)
        assert enc.embed(torch.randn(2, 12, 256)).shape == (2, 2048)


def test_width_and_stem_options():
    enc = ResNet1d(SPEC, variant="resnet18", width=8, stem_pool=False, stem_stride=1).eval()
    assert enc.embed_dim == 64 and enc.downsampling == 8
    assert enc.tokens(torch.randn(1, 12, 800)).shape == (1, 100, 64)


def test_zero_init_residual_makes_blocks_start_as_identity_paths():
    enc = ResNet1d(SPEC)
    blocks = [b for stage in enc.stages for b in stage]
    assert all(torch.all(b.last_bn.weight == 0) for b in blocks)
    assert all(torch.all(b.last_bn.weight == 1) for b in [*ResNet1d(SPEC, zero_init_residual=False).stages[0]])


def test_reduced_leads_are_zero_filled():
    torch.manual_seed(0)
    enc = ResNet1d(SPEC, width=8).eval()
    x = torch.randn(2, 2, 400)
    full = torch.zeros(2, 12, 400)
    full[:, STANDARD_LEADS.index("II")] = x[:, 0]
    full[:, STANDARD_LEADS.index("V1")] = x[:, 1]
    with torch.no_grad():
        assert torch.allclose(enc.embed(x, leads=("II", "V1")), enc.embed(full), atol=1e-6)
        reordered = enc.embed(x.flip(1), leads=("V1", "II"))
        assert torch.allclose(reordered, enc.embed(full), atol=1e-6)


def test_lead_errors_are_config_errors():
    enc = ResNet1d(SPEC, width=8)
    with pytest.raises(ConfigError, match=r"cannot take \['X9'\]"):
        enc.embed(torch.randn(1, 1, 100), leads=("X9",))
    with pytest.raises(ConfigError, match="built for 12 leads"):
        enc.embed(torch.randn(1, 3, 100))
    with pytest.raises(ConfigError, match="names 2 leads but the signal has 3 rows"):
        enc.embed(torch.randn(1, 3, 100), leads=("I", "II"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"variant": "resnet5"},
         r"\[encoder\] cannot build encoder 'resnet1d': variant 'resnet5'.*Did you mean 'resnet50'"),
        ({"kernel_size": 4}, "kernel_size must be a positive odd integer"),
        ({"widht": 8}, r"unknown key 'widht'.*Did you mean 'width'"),
        ({"width": 0}, "width must be a positive integer"),
    ],
)
def test_bad_options(registry, options, message):
    with pytest.raises(ConfigError, match=message):
        registry.build("encoder", "resnet1d", options, section="encoder", spec=SPEC)


def test_gradients_reach_the_stem():
    enc = ResNet1d(SPEC, width=8)
    enc.embed(torch.randn(4, 12, 300)).pow(2).sum().backward()
    assert enc.stem[0].weight.grad is not None and enc.stem[0].weight.grad.abs().sum() > 0
