"""CMSC: adjacent segments, patient-aware positives, symmetric InfoNCE, training lowers the loss."""

from __future__ import annotations

import math

import pytest
import torch

import ssl4ecg_cmsc
from ssl4ecg.errors import ConfigError, DataError
from ssl4ecg.interfaces import STANDARD_LEADS, Batch, SignalSpec, StepInfo
from ssl4ecg.nn import resnet1d
from ssl4ecg.nn.losses import info_nce
from ssl4ecg.registry import Registry
from ssl4ecg_cmsc import adjacent_segments, patient_positive_mask

SPEC = SignalSpec(STANDARD_LEADS, 100.0, 400)


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    resnet1d.register(reg)
    ssl4ecg_cmsc.ssl4ecg_register(reg)
    return reg


def build(registry, spec=SPEC, **options):
    torch.manual_seed(0)
    encoder = registry.build("encoder", "resnet1d", {"width": 8}, section="encoder", spec=spec)
    return registry.build("objective", "cmsc", options, section="objective", spec=spec, encoder=encoder)


def batch(patients: list[str], spec=SPEC) -> Batch:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(len(patients), spec.n_leads, spec.n_samples, generator=g)
    return Batch(x, spec.leads, spec.sampling_rate, record_ids=[f"r{i}" for i in range(len(patients))],
                 patient_ids=list(patients))


def step(seed: int = 0) -> StepInfo:
    return StepInfo(step=0, total_steps=10, epoch=0, generator=torch.Generator().manual_seed(seed))


def test_segments_are_adjacent_and_non_overlapping():
    n = 1000
    x = torch.arange(n, dtype=torch.float32).expand(6, 2, n).clone()
    x[:, 1] += 10_000  # leads stay aligned
    first, second, start = adjacent_segments(x, 300, torch.Generator().manual_seed(0))
    assert first.shape == second.shape == (6, 2, 300)
    assert torch.equal(first[:, 0, 0], start.float())
    assert torch.equal(second[..., 0], first[..., -1] + 1)  # second starts right after the first ends
    assert torch.equal(first[..., 1:] - first[..., :-1], torch.ones(6, 2, 299))
    assert (start >= 0).all() and (start <= n - 600).all() and start.unique().numel() > 1
    # records exactly two segments long always start at 0
    f, s, st = adjacent_segments(x[..., :600], 300, torch.Generator().manual_seed(0))
    assert (st == 0).all() and torch.equal(torch.cat([f, s], dim=-1), x[..., :600])
    with pytest.raises(ConfigError, match="two adjacent segments of 400 samples"):
        adjacent_segments(x[..., :600], 400, torch.Generator())


def test_positive_mask_follows_patient_ids():
    mask = patient_positive_mask(["a", "b", "a", "c", "b", "a"], 6)
    expected = torch.tensor(
        [[1, 0, 1, 0, 0, 1],
         [0, 1, 0, 0, 1, 0],
         [1, 0, 1, 0, 0, 1],
         [0, 0, 0, 1, 0, 0],
         [0, 1, 0, 0, 1, 0],
         [1, 0, 1, 0, 0, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    assert torch.equal(patient_positive_mask([], 3), torch.eye(3, dtype=torch.bool))
    # unknown patients match nobody; equal ids from different datasets of a mixture do not match
    assert torch.equal(patient_positive_mask([None, None, "", ""], 4), torch.eye(4, dtype=torch.bool))
    mixed = patient_positive_mask(["7", "7", "7"], 3, groups=torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(mixed, torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool))
    with pytest.raises(DataError, match="4 signals but 2 patient ids"):
        patient_positive_mask(["a", "b"], 4)


def test_default_segment_is_half_the_record_and_option_in_seconds(registry):
    assert build(registry).segment == 200
    assert build(registry, segment_seconds=1.5).segment == 150


def test_loss_is_symmetric_multi_positive_info_nce(registry):
    obj = build(registry, temperature=0.1)
    b = batch(["a", "b", "a", "c", "b", "a"])
    out = obj.loss(b, step(7))
    first, second, _ = adjacent_segments(b.signal, 200, step(7).generator)
    z = obj.head(obj.encoder.embed(torch.cat([first, second])))
    pos = patient_positive_mask(b.patient_ids, 6)
    expected = 0.5 * (info_nce(z[:6], z[6:], pos, 0.1) + info_nce(z[6:], z[:6], pos.t(), 0.1))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.logs["patient_pairs_per_sample"] == pytest.approx(8 / 6)  # 3 patient-a pairs x 2 + 1 b pair x 2
    assert out.representation.shape == (6, obj.encoder.embed_dim) and not out.representation.requires_grad
    # patient positives change the objective; without them only same-record pairs count
    same_record = build(registry, patient_positives=False).loss(b, step(7))
    only_diag = 0.5 * (info_nce(z[:6], z[6:], torch.eye(6, dtype=torch.bool), 0.1)
                       + info_nce(z[6:], z[:6], torch.eye(6, dtype=torch.bool), 0.1))
    assert same_record.loss.item() == pytest.approx(only_diag.item(), rel=1e-5)
    assert same_record.loss.item() != pytest.approx(out.loss.item(), rel=1e-3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"segment_seconds": 2.5}, r"\[objective\] cannot build objective 'cmsc'.*use at most 2 s"),
        ({"segment_seconds": -1.0}, "segment_seconds must be > 0"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"segment": 1.0}, r"unknown key 'segment'.*Did you mean 'segment_seconds'"),
    ],
)
def test_bad_options_are_config_errors(registry, options, message):
    with pytest.raises(ConfigError, match=message):
        build(registry, **options)


def test_twenty_adam_steps_lower_the_loss(registry):
    obj = build(registry, segment_seconds=1.0)
    obj.train()
    opt = torch.optim.Adam(obj.parameters(), lr=1e-3)
    b = batch([str(i // 2) for i in range(16)])  # pairs of records per patient
    losses = []
    for _ in range(20):
        out = obj.loss(b, step(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    # two positives per row share one softmax: the pairs-averaged InfoNCE cannot go below log 2
    assert min(losses) > math.log(2) - 1e-4
