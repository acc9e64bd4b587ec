"""The collapse monitor's statistics and warning."""

import pytest
import torch

from ssl4ecg.train.monitor import CollapseMonitor, CollapseWarning, representation_stats


def test_stats_of_spread_and_collapsed_batches():
    g = torch.Generator().manual_seed(0)
    spread = representation_stats(torch.randn(256, 16, generator=g))
    assert spread["rep_std"] == pytest.approx(1.0, abs=0.1)
    assert spread["rep_rank"] > 14
    collapsed = torch.ones(256, 16) + 1e-4 * torch.randn(256, 16, generator=g)
    assert representation_stats(collapsed)["rep_std"] < 0.01
    rank_one = torch.randn(256, 1, generator=g) * torch.randn(1, 16, generator=g)
    assert representation_stats(rank_one)["rep_rank"] == pytest.approx(1.0, abs=1e-3)


def test_effective_rank_matches_hand_computation():
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    # singular values of the centred batch: 2*sqrt(2) and sqrt(2) -> p = (2/3, 1/3)
    p = torch.tensor([2 / 3, 1 / 3])
    assert representation_stats(z)["rep_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-5)


def test_monitor_warns_once_on_relative_collapse():
    g = torch.Generator().manual_seed(1)
    monitor = CollapseMonitor(patience=2)
    monitor.update(torch.randn(64, 8, generator=g), step=1)
    collapsed = torch.ones(64, 8) + 1e-5 * torch.randn(64, 8, generator=g)
    monitor.update(collapsed, step=2)
    with pytest.warns(CollapseWarning, match="collapse suspected at step 3"):
        monitor.update(collapsed, step=3)
    assert monitor.warned
