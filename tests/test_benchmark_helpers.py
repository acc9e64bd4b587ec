"""The accounting helpers of benchmarks/train_throughput.py (the numbers the README quotes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_throughput as tt  # noqa: E402


def test_matmul_flops_from_recorded_shapes():
    assert tt._matmul_flops("aten::mm", [[12, 5], [5, 7]]) == 2 * 12 * 5 * 7
    # addmm/baddbmm: the first input is the bias / the accumulator
    assert tt._matmul_flops("aten::addmm", [[7], [12, 5], [5, 7], [], []]) == 2 * 12 * 5 * 7
    assert tt._matmul_flops("aten::bmm", [[3, 4, 5], [3, 5, 6]]) == 2 * 3 * 4 * 5 * 6
    assert tt._matmul_flops("aten::baddbmm", [[3, 4, 6], [3, 4, 5], [3, 5, 6]]) == 2 * 3 * 4 * 5 * 6
    assert tt._matmul_flops("aten::mm", []) == 0  # shapes not recorded


def test_stolen_share_from_cpu_counters():
    start = [100, 0, 10, 500, 0, 0, 0, 5, 0, 0]
    # +60 user, +20 system, +100 idle, +20 steal: 20 of 200 jiffies stolen
    end = [160, 0, 30, 600, 0, 0, 0, 25, 0, 0]
    assert tt.stolen_share(start, end) == pytest.approx(0.1)
    assert tt.stolen_share(None, end) is None
    assert tt.stolen_share(start, start) is None  # no time passed
    assert tt.stolen_share([1, 2, 3], [4, 5, 6]) is None  # no steal column


def test_step_breakdown_counts_the_matmuls_of_a_step():
    x, w, b = torch.randn(64, 32), torch.randn(48, 32), torch.randn(48)
    a, c = torch.randn(4, 8, 16), torch.randn(4, 16, 8)

    def step() -> float:
        y = torch.nn.functional.linear(x, w, b)  # addmm: 2 * 64 * 32 * 48
        z = torch.bmm(a, c)  # bmm: 2 * 4 * 8 * 16 * 8
        return float(torch.relu(y).sum() + z.sum())

    parts = tt.step_breakdown(step, top=100)
    assert parts["matmul_flops"] == 2 * 64 * 32 * 48 + 2 * 4 * 8 * 16 * 8
    assert 0.0 < parts["matmul_share"] <= 1.0
    assert parts["matmul_s"] <= parts["wall_s"]
    assert "aten::relu" in parts["other_top"] or "aten::clamp_min" in parts["other_top"]


def test_variant_precision():
    assert [tt.variant_precision(v) for v in ("fp32", "fp32-plain", "bf16+compile", "fp32+fusedadam")] == [
        "fp32", "fp32", "bf16", "fp32"]
