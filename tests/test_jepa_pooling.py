"""CroPAViT's pooling options: the paper's mean and the per-lead means concatenated."""

import pytest
import torch

from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import JEPA_LEADS, SignalSpec
from ssl4ecg.registry import get_registry

SPEC = SignalSpec(JEPA_LEADS, 100.0, 500)


def build(**options):
    torch.manual_seed(0)
    opts = {"dim": 16, "depth": 1, "heads": 2, "drop_path": 0.0, **options}
    return get_registry().build("encoder", "cropa_vit", opts, "encoder", spec=SPEC).eval()


def test_mean_pool_is_the_token_mean():
    enc = build()
    x = torch.randn(3, 8, 500)
    assert enc.embed_dim == 16
    assert torch.allclose(enc.embed(x), enc.tokens(x).mean(1), atol=1e-6)


def test_lead_mean_pool_concatenates_each_leads_mean():
    enc = build(pool="lead_mean")
    x = torch.randn(3, 8, 500)
    z = enc.embed(x)
    assert z.shape == (3, 8 * 16) and enc.embed_dim == 128
    per_lead = enc.tokens(x).reshape(3, 8, 10, 16).mean(2)
    assert torch.allclose(z.reshape(3, 8, 16), per_lead, atol=1e-6)
    # reduced leads keep the width: absent leads are zeros, present ones in their own slot
    sub = enc.embed(x[:, [1, 5]], leads=["II", "V4"]).reshape(3, 8, 16)
    assert sub[:, [0, 2, 3, 4, 6, 7]].abs().sum() == 0
    assert sub[:, 1].abs().sum() > 0 and sub[:, 5].abs().sum() > 0


def test_unknown_pool_is_refused():
    with pytest.raises(ConfigError, match="pool = 'max' is not one of mean, lead_mean"):
        build(pool="max")
