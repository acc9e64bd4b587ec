"""Plugin discovery through entry points, exactly the path a third-party package takes."""

from __future__ import annotations

import json
import textwrap
import warnings

import pytest

import ssl4ecg.registry as registry_module
from ssl4ecg.errors import ConfigError
from ssl4ecg.hooks import PluginLoadWarning
from ssl4ecg.recipe import parse_recipe
from ssl4ecg.registry import Registry, collect, get_registry

EXTERNAL_PLUGIN = '''
"""A third-party ssl4ecg plugin: a tiny conv encoder and an amplitude-regression objective."""
import torch
from torch import nn

from ssl4ecg import hookimpl
from ssl4ecg.interfaces import Encoder, LossOutput, Objective


class TinyConv(Encoder):
    """Two strided convolutions; tokens are time steps."""

    def __init__(self, spec, width: int = 16):
        super().__init__()
        self.spec = spec
        self.embed_dim = width
        self.net = nn.Sequential(nn.Conv1d(spec.n_leads, width, 7, stride=4), nn.GELU(),
                                 nn.Conv1d(width, width, 7, stride=4))

    def tokens(self, x, leads=None):
        idx = self.lead_indices(leads)
        full = x.new_zeros(x.shape[0], self.spec.n_leads, x.shape[-1])
        full[:, idx] = x
        return self.net(full).transpose(1, 2)


class PredictLeadRms(Objective):
    """Regress each lead's RMS amplitude from the pooled embedding."""

    def __init__(self, encoder, spec):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, spec.n_leads)

    def loss(self, batch, step):
        target = batch.signal.pow(2).mean(dim=-1).sqrt()
        z = self.encoder.embed(batch.signal, batch.leads)
        return LossOutput(nn.functional.mse_loss(self.head(z), target), representation=z.detach())


@hookimpl
def ssl4ecg_register(registry):
    registry.add("encoder", "tiny_conv", TinyConv)
    registry.add("objective", "predict_lead_rms", PredictLeadRms)
'''


def _install(tmp_path, dist: str, module: str, source: str) -> None:
    """Make ``module`` importable and announce it under the ``ssl4ecg`` entry-point group."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    info = tmp_path / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[ssl4ecg]\n{module} = {module}\n")


@pytest.fixture
def fresh_registry():
    """Rebuild the global registry after the test so installed test plugins do not leak."""
    yield
    registry_module._REGISTRY = None


def test_builtin_components_are_listed():
    registry = get_registry()
    assert "jepa" in registry.names("objective")
    assert "cropa_vit" in registry.names("encoder")
    assert {"random", "multiblock"} <= set(registry.names("masker"))
    assert "linear_probe" in registry.names("evaluator")
    assert "synthetic" in registry.names("source")
    jepa = registry.get("objective", "jepa")
    assert jepa.package.startswith("ssl4ecg")  # came through the ssl4ecg distribution's entry point


def test_external_plugin_trains_through_a_recipe(tmp_path, monkeypatch, fresh_registry):
    _install(tmp_path, "ext-ssl-plugin", "ext_ssl_plugin", EXTERNAL_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = get_registry(reload=True)
    component = registry.get("objective", "predict_lead_rms")
    assert component.package == "ext-ssl-plugin 0.1"
    from ssl4ecg.run import run_recipe

    recipe = parse_recipe("""
[run]
name = "ext"
[data]
source = "synthetic"
n_records = 120
sampling_rate = 100.0
[encoder]
name = "tiny_conv"
[objective]
name = "predict_lead_rms"
[train]
epochs = 4
batch_size = 16
lr = 3e-3
warmup_epochs = 0.0
precision = "fp32"
log_every = 1
""")
    run_dir, metrics = run_recipe(recipe, out_dir=tmp_path / "run", registry=registry)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert metrics["pretrain"]["steps"] == log[-1]["step"] > 4
    assert log[-1]["loss"] < log[0]["loss"]
    assert (run_dir / "encoder.pt").exists()


def test_broken_plugin_warns_and_the_rest_works(tmp_path, monkeypatch, fresh_registry):
    _install(tmp_path, "broken-plugin", "broken_ssl_plugin", "raise ImportError('needs a missing library')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = get_registry(reload=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]
    assert any("broken_ssl_plugin" in m and "needs a missing library" in m for m in messages)
    assert "jepa" in registry.names("objective")


def test_two_components_with_one_name_is_a_clear_error(tmp_path, monkeypatch, fresh_registry):
    clash = EXTERNAL_PLUGIN.replace('"tiny_conv"', '"cropa_vit"')
    _install(tmp_path, "clash-plugin", "clash_ssl_plugin", clash)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="two encoders are named 'cropa_vit'.*clash-plugin"):
        collect()


def test_registry_rejects_unknown_kind_and_suggests_names():
    registry = Registry()
    with pytest.raises(ConfigError, match="unknown component kind 'encodr'.*Did you mean 'encoder'"):
        registry.add("encodr", "x", object)
    registry.add("encoder", "alpha", object)
    with pytest.raises(ConfigError, match="no encoder named 'alpah'.*Did you mean 'alpha'"):
        registry.get("encoder", "alpah")


def test_build_checks_options_against_the_signature():
    registry = Registry()

    def factory(width: int = 4, depth: int = 2, spec=None):
        """A factory."""
        return (width, depth, spec)

    registry.add("encoder", "f", factory)
    assert registry.build("encoder", "f", {"width": 8}, "encoder", spec="S") == (8, 2, "S")
    with pytest.raises(ConfigError, match=r"\[encoder\] unknown key 'widht'.*Did you mean 'width'"):
        registry.build("encoder", "f", {"widht": 8}, "encoder")
    with pytest.raises(ConfigError, match="'depth' should be int"):
        registry.build("encoder", "f", {"depth": "deep"}, "encoder")
    with pytest.raises(ConfigError, match="unknown key 'spec'"):
        registry.build("encoder", "f", {"spec": 1}, "encoder")
