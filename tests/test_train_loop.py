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
from ssl4ecg.train.checkpoint import (
    capture_rank_state, load_checkpoint, rank_states_of, restore_rank_state, save_checkpoint,
)
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


def test_nan_loss_stops_naming_the_logged_step_and_the_real_checkpoint(tmp_path):
    tr = trainer(tmp_path, {"nan_at": 6})  # the 7th step (logged as step 7) is non-finite
    with pytest.raises(TrainingError) as caught:
        tr.fit()
    message = str(caught.value)
    assert "non-finite at step 7;" in message
    assert f"The last checkpoint ({tmp_path / 'checkpoints' / 'last.pt'}) holds step 4." in message
    assert "--set train.lr=" in message and "--resume" not in message  # a remedy that works
    assert load_checkpoint(tmp_path / "checkpoints")["step"] == 4
    logged = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]  # step 7 is not logged as if it were finite
    # the bad update was never applied: weights finite, AdamW's step count stops at 6
    assert all(torch.isfinite(p).all() for p in tr.objective.parameters())
    steps = {int(s["step"]) for s in tr.optimizer.state_dict()["state"].values()}
    assert steps == {6}


def test_nan_message_says_when_no_checkpoint_exists(tmp_path):
    tr = trainer(tmp_path, {"nan_at": 1})
    with pytest.raises(TrainingError, match="at step 2; .*No checkpoint was written before it"):
        tr.fit()


def test_nan_skip_policy_counts_at_the_next_log_step(tmp_path):
    tr = trainer(tmp_path, {"nan_at": 6}, nan_policy="skip", log_every=5)
    summary = tr.fit()
    assert summary["skipped_steps"] == 1
    assert tr.state.first_bad_step == 7
    assert math.isfinite(summary["final_loss"])
    assert all(torch.isfinite(p).all() for p in tr.objective.parameters())


def test_nan_skip_policy_stops_after_max_skipped(tmp_path):
    class AlwaysNaN(NoisyReconstruction):
        def loss(self, batch, step):
            out = super().loss(batch, step)
            return LossOutput(out.loss * float("nan"), out.logs, out.representation)

    torch.manual_seed(0)
    tr = Trainer(AlwaysNaN(), BatchLoader(make_records(), 8, seed=0),
                 cfg(nan_policy="skip", max_skipped=2, log_every=1), tmp_path, torch.device("cpu"), "fp32", seed=0)
    with pytest.raises(TrainingError, match="3 non-finite steps were skipped .*max_skipped = 2.*first at step 1"):
        tr.fit()


def test_no_host_sync_between_logging_steps(tmp_path, monkeypatch):
    """The loop reads device values only at logging/checkpoint steps: reads do not grow with steps."""
    import sys

    loop_file = sys.modules[Trainer.__module__].__file__
    calls = {"n": 0}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename == loop_file:
                calls["n"] += 1
            return original(self, *args, **kwargs)
        return wrapper

    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    counts = []
    for steps in (6, 18):
        calls["n"] = 0
        trainer(tmp_path / str(steps), max_steps=steps, log_every=1000, checkpoint_every=1000).fit()
        counts.append(calls["n"])
    assert counts[0] == counts[1], counts
    assert counts[0] <= 20  # two logging steps (the first and the last) and the end of training


def test_a_skipped_step_leaves_weights_and_optimizer_state_untouched(tmp_path):
    tr = trainer(tmp_path)
    batches = tr._batches()
    info = lambda step: __import__("ssl4ecg.interfaces", fromlist=["StepInfo"]).StepInfo(  # noqa: E731
        step=step, total_steps=10, epoch=0, generator=tr.generator)
    loss, *_ = tr._accumulate(batches, info(0))
    tr._optimizer_step(loss, 1)
    before = {k: v.clone() for k, v in tr.objective.state_dict().items()}
    moments = {k: {n: t.clone() for n, t in v.items()} for k, v in tr.optimizer.state_dict()["state"].items()}
    out = tr._accumulate(batches, info(1))
    tr._optimizer_step(out[0] * float("nan"), 2)
    for k, v in tr.objective.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, state in tr.optimizer.state_dict()["state"].items():
        for n, t in state.items():
            assert torch.equal(t, moments[k][n]), (k, n)
    batches.close()


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


def test_every_rank_resumes_its_own_random_states_on_any_number_of_processes():
    """Per-rank generator states (CPU generators stand in for the GPU's)."""
    saved_world = 2
    gens = [torch.Generator().manual_seed(100 + r) for r in range(saved_world)]
    devs = [torch.Generator().manual_seed(200 + r) for r in range(saved_world)]
    for g, d in zip(gens, devs):
        torch.rand(3, generator=g), torch.rand(5, generator=d)
    states = [capture_rank_state(g, d) for g, d in zip(gens, devs)]
    expected = [(torch.rand(4, generator=g), torch.rand(4, generator=d)) for g, d in zip(gens, devs)]
    checkpoint = {"step": 7, "ranks": states}
    for world in (1, 2, 3):
        draws = []
        for rank in range(world):
            g, d = torch.Generator(), torch.Generator()
            had = restore_rank_state(rank_states_of(checkpoint), rank, g, d, fallback_seed=(0, 7))
            assert had == (rank < saved_world)
            draws.append((torch.rand(4, generator=g), torch.rand(4, generator=d)))
        for rank in range(min(world, saved_world)):  # each rank continues its own stream
            assert torch.equal(draws[rank][0], expected[rank][0]) and torch.equal(draws[rank][1], expected[rank][1])
        flat = [tuple(t.tolist()) for pair in draws for t in pair]
        assert len(set(flat)) == len(flat)  # no two ranks share a stream
    # a rank the checkpoint lacked gets the same fresh seed every time
    again = [torch.Generator(), torch.Generator()]
    restore_rank_state(states, 2, *again, fallback_seed=(0, 7))
    assert torch.equal(torch.rand(4, generator=again[0]), draws[2][0])


def test_checkpoints_from_before_per_rank_states_still_resume():
    g = torch.Generator().manual_seed(5)
    legacy = {"step": 1, "generator": g.get_state(), "rng": {"python": __import__("random").getstate(),
              "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    expected = torch.rand(3, generator=g)
    fresh = torch.Generator()
    assert restore_rank_state(rank_states_of(legacy), 0, fresh, fresh)
    assert torch.equal(torch.rand(3, generator=fresh), expected)


def test_rank_states_hold_only_this_process_s_gpu_state(monkeypatch):
    """get/set_rng_state_all fail on fewer visible GPUs and give every rank rank 0's state."""
    def refuse(*args, **kwargs):
        raise AssertionError("get/set_rng_state_all must not be used")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    g = torch.Generator()
    state = capture_rank_state(g, g, torch.device("cpu"))
    assert "cuda_device" not in state["rng"]
    restore_rank_state([state], 0, g, g, torch.device("cpu"))


def test_resume_continues_exactly_with_a_separate_device_generator(tmp_path):
    """The device generator (a CPU stand-in here) is checkpointed and restored too."""
    class DeviceNoise(NoisyReconstruction):
        def loss(self, batch, step):
            out = super().loss(batch, step)
            extra = torch.randn((), generator=step.device_generator) * 1e-3
            return LossOutput(out.loss + extra, out.logs, out.representation)

    def make(path, **kw):
        torch.manual_seed(0)
        tr = Trainer(DeviceNoise(**kw), BatchLoader(make_records(), 8, seed=0), cfg(), path,
                     torch.device("cpu"), "fp32", seed=0)
        tr.device_generator = torch.Generator().manual_seed(99)
        return tr

    straight = make(tmp_path / "a")
    straight.fit()
    crashed = make(tmp_path / "b", fail_at=10)
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    resumed = make(tmp_path / "b")
    resumed.device_generator.manual_seed(12345)  # must be overwritten by the checkpoint
    assert resumed.resume()
    resumed.fit()
    for (name, a), (_, b) in zip(straight.objective.state_dict().items(), resumed.objective.state_dict().items()):
        assert torch.equal(a, b), name
