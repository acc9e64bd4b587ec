"""The shared training loop: schedules, parameter groups, checkpoints, exact resume, NaNs, budgets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from ssl4ecg.data.loader import BatchLoader
from ssl4ecg.data.records import RecordSet
from ssl4ecg.errors import CheckpointError, TrainingError
from ssl4ecg.interfaces import Encoder, LossOutput, Objective, SignalSpec
from ssl4ecg.recipe import TRAIN_DEFAULTS
from ssl4ecg.train.checkpoint import load_checkpoint, save_checkpoint
from ssl4ecg.train.loop import Trainer
from ssl4ecg.train.optim import cosine_lr, param_groups

SPEC = SignalSpec(("I", "II"), 100.0, 200)


class TinyEncoder(Encoder):
    def __init__(self):
        super().__init__()
        self.spec = SPEC
        self.embed_dim = 8
        self.conv = nn.Conv1d(2, 8, 5, stride=5)
        self.norm = nn.LayerNorm(8)

    def tokens(self, x, leads=None):
        return self.norm(self.conv(x).transpose(1, 2))


class NoisyReconstruction(Objective):
    """Uses the step generator (like masks do) so resume must restore it exactly."""

    def __init__(self, fail_at: int | None = None, nan_at: int | None = None):
        super().__init__()
        self.encoder = TinyEncoder()
        self.decoder = nn.Linear(8, 10)
        self.fail_at = fail_at
        self.nan_at = nan_at
        self.after_calls = 0

    def loss(self, batch, step):
        noise = torch.randn(batch.signal.shape, generator=step.generator) * 0.1
        tokens = self.encoder.tokens(batch.signal + noise)
        target = batch.signal.unfold(-1, 5, 5).mean(-1).transpose(1, 2)  # [B, 40, 2]
        pred = self.decoder(tokens)[..., :2]
        loss = (pred - target).pow(2).mean()
        if self.nan_at is not None and step.step == self.nan_at:
            self.nan_at = None  # one bad batch
            loss = loss * float("nan")
        return LossOutput(loss, logs={"noise": 0.1}, representation=tokens.mean(1).detach())

    def after_step(self, step):
        self.after_calls += 1
        if self.fail_at is not None and step.step + 1 == self.fail_at:
            raise KeyboardInterrupt("simulated crash")


def make_records(n=48):
    rng = np.random.default_rng(0)
    t = np.arange(200) / 100.0
    sig = np.sin(2 * np.pi * rng.uniform(0.5, 3, (n, 2, 1)) * t) + 0.1 * rng.standard_normal((n, 2, 200))
    return RecordSet(signals=sig.astype(np.float32), leads=("I", "II"), sampling_rate=100.0,
                     record_ids=[f"r{i}" for i in range(n)])


def cfg(**kw):
    return {**TRAIN_DEFAULTS, "epochs": 3, "batch_size": 8, "lr": 1e-2, "warmup_epochs": 0.5,
            "log_every": 1, "checkpoint_every": 4, "precision": "fp32", **kw}


def trainer(tmp_path, objective_kw=None, **kw):
    torch.manual_seed(0)
    objective = NoisyReconstruction(**(objective_kw or {}))
    loader = BatchLoader(make_records(), 8, seed=0)
    return Trainer(objective, loader, cfg(**kw), tmp_path, torch.device("cpu"), "fp32", seed=0)


def test_cosine_schedule_end_points():
    assert cosine_lr(0, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_lr(10, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(0.1)


def test_no_weight_decay_on_biases_norms_and_1d():
    groups = param_groups(NoisyReconstruction(), 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    model = NoisyReconstruction()
    groups = param_groups(model, 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert id(model.encoder.conv.weight) in decayed and id(model.decoder.weight) in decayed
    for p in (model.encoder.conv.bias, model.encoder.norm.weight, model.encoder.norm.bias, model.decoder.bias):
        assert id(p) not in decayed


def test_training_lowers_the_loss_and_logs(tmp_path):
    tr = trainer(tmp_path)
    summary = tr.fit()
    assert summary["steps"] == 3 * (48 // 8)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, summary["steps"] + 1))
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert {"lr", "samples_per_s", "noise", "rep_std", "rep_rank"} <= set(log[0])
    assert tr.objective.after_calls == summary["steps"]


def test_resume_continues_exactly(tmp_path):
    straight = trainer(tmp_path / "a")
    straight.fit()
    crashed = trainer(tmp_path / "b", {"fail_at": 10})
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    resumed = trainer(tmp_path / "b")
    assert resumed.resume()
    assert resumed.state.step == 8  # the checkpoint before the crash (checkpoint_every = 4)
    resumed.fit()
    for (name, a), (_, b) in zip(straight.objective.state_dict().items(), resumed.objective.state_dict().items()):
        assert torch.equal(a, b), name
    log_a = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "samples_per_s"} for x in lines]  # noqa: E731
    assert strip(log_a) == strip(log_b)


def test_max_steps_and_time_budget(tmp_path):
    assert trainer(tmp_path / "s", max_steps=5).fit()["steps"] == 5
    tr = trainer(tmp_path / "t", epochs=10_000, max_minutes=0.02)
    summary = tr.fit()
    assert summary["seconds"] < 10
    # the budget fixed the schedule to the steps that fit (estimated from the first steps)
    assert summary["horizon"] < 10_000 * 6
    assert 0.5 * summary["horizon"] <= summary["steps"] <= summary["horizon"]


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    tr = trainer(tmp_path, {"nan_at": 6})
    with pytest.raises(TrainingError, match="the loss became nan at step 6.*last good checkpoint"):
        tr.fit()
    assert load_checkpoint(tmp_path / "checkpoints")["step"] == 4


def test_nan_skip_policy_counts(tmp_path):
    tr = trainer(tmp_path, {"nan_at": 6}, nan_policy="skip")
    summary = tr.fit()
    assert summary["skipped_steps"] == 1
    assert math.isfinite(summary["final_loss"])


def test_corrupt_last_checkpoint_falls_back_to_previous(tmp_path):
    save_checkpoint(tmp_path, {"step": 1})
    save_checkpoint(tmp_path, {"step": 2})
    assert load_checkpoint(tmp_path)["step"] == 2
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="unreadable; resuming from .*previous.pt"):
        assert load_checkpoint(tmp_path)["step"] == 1
    (tmp_path / "previous.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_checkpoint(tmp_path)
