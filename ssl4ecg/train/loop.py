"""The one training loop every objective trains through.

It owns: the data order (a :class:`ssl4ecg.data.loader.BatchLoader`), AdamW with
parameter groups, the warm-up + cosine schedule, gradient accumulation and clipping,
bf16 autocast, the per-step objective hook (EMA updates), the collapse monitor,
``log.jsonl``, atomic checkpoints with every random state (exact resume), the time budget
and NaN handling. Under ``torchrun`` it wraps the objective in DistributedDataParallel,
gives every rank its share of each epoch and writes files from rank 0 only.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl4ecg.errors import TrainingError
from ssl4ecg.interfaces import Batch, LossOutput, Objective, StepInfo
from ssl4ecg.io import atomic_write_text
from ssl4ecg.train import distributed as dist
from ssl4ecg.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ssl4ecg.train.device import autocast
from ssl4ecg.train.monitor import CollapseMonitor
from ssl4ecg.train.optim import cosine_lr, make_optimizer

#: optimiser steps timed before a time budget fixes the schedule horizon
TIMING_STEPS = 5


class _LossModule(nn.Module):
    """Adapter so DistributedDataParallel can wrap an objective (DDP calls ``forward``)."""

    def __init__(self, objective: Objective) -> None:
        super().__init__()
        self.objective = objective

    def forward(self, batch: Batch, step: StepInfo):  # noqa: D401 - adapter
        out = self.objective.loss(batch, step)
        return out.loss, out.logs, out.representation


@dataclass
class TrainState:
    """Counters that a checkpoint restores."""

    step: int = 0  # optimiser steps done
    epoch: int = 0
    horizon: int = 0  # schedule length in optimiser steps
    horizon_fixed: bool = False  # True once a time budget has fixed the horizon
    seconds: float = 0.0  # training time spent (summed over resumed segments)
    samples: int = 0  # training samples seen (all ranks)
    skipped: int = 0  # non-finite steps skipped
    last_loss: float = float("nan")
    done: bool = False


class Trainer:
    """Trains ``objective`` on ``loader`` according to the ``[train]`` recipe section."""

    def __init__(self, objective: Objective, loader, train_cfg: dict[str, Any], run_dir: Path | None,
                 device: torch.device, precision: str, seed: int) -> None:
        self.objective = objective.to(device)
        self.loader = loader
        self.cfg = train_cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None and dist.is_rank0():
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.precision = precision
        self.rank0 = dist.is_rank0()
        self.world = dist.world_size()
        self.accum = max(1, int(train_cfg["accum_steps"]))
        self.generator = torch.Generator().manual_seed(int(seed) * 1000 + 17 + dist.rank())
        self.state = TrainState()
        self.monitor = CollapseMonitor()
        module: nn.Module = _LossModule(self.objective)
        if self.world > 1:
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None)
        self.module = module
        if train_cfg.get("compile"):
            self.module = torch.compile(self.module)
        self.optimizer = make_optimizer(self.objective, train_cfg["lr"], train_cfg["weight_decay"],
                                        train_cfg["betas"], device)
        steps_per_epoch = max(1, len(loader) // self.accum)
        self.steps_per_epoch = steps_per_epoch
        planned = int(train_cfg["epochs"]) * steps_per_epoch
        if int(train_cfg["max_steps"]) >= 0:
            planned = min(planned, int(train_cfg["max_steps"]))
        self.state.horizon = planned
        self.loader.set_epoch(0)
        self.warmup_steps = int(round(float(train_cfg["warmup_epochs"]) * steps_per_epoch))

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "checkpoints"

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.state.step,
            "train_state": vars(self.state).copy(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
            "generator": self.generator.get_state(),
            "rng": rng_state(),
            "monitor": self.monitor.state_dict(),
            "world_size": self.world,
        }

    def save(self) -> None:
        if self.rank0 and self.checkpoint_dir is not None:
            save_checkpoint(self.checkpoint_dir, self.state_dict())
        dist.barrier()

    def resume(self) -> bool:
        """Restore the newest checkpoint of the run directory; False when there is none."""
        if self.checkpoint_dir is None or not any(self.checkpoint_dir.glob("*.pt")):
            return False
        ckpt = load_checkpoint(self.checkpoint_dir)
        self.objective.load_state_dict(ckpt["objective"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        saved_world = int(ckpt.get("world_size", 1))
        if saved_world == self.world:
            self.loader.load_state_dict(ckpt["loader"])
        else:
            # A different number of processes: every rank takes a strided share of one
            # permutation, so the first `position * batch * saved_world` samples of the epoch
            # are consumed either way; continue after them.
            consumed = int(ckpt["loader"]["position"]) * saved_world
            self.loader.load_state_dict({"epoch": ckpt["loader"]["epoch"],
                                         "position": min(len(self.loader), consumed // self.world)})
        self.generator.set_state(ckpt["generator"])
        set_rng_state(ckpt["rng"])
        self.state = TrainState(**ckpt["train_state"])
        self.monitor.load_state_dict(ckpt.get("monitor", {}))
        self._truncate_log(self.state.step)
        return True

    # ------------------------------------------------------------------ logging
    def _log(self, record: dict[str, Any]) -> None:
        if not self.rank0 or self.run_dir is None:
            return
        with open(self.run_dir / "log.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from."""
        if not self.rank0 or self.run_dir is None:
            return
        path = self.run_dir / "log.jsonl"
        if not path.exists():
            return
        lines = [line for line in path.read_text(encoding="utf-8").splitlines()
                 if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(path, "".join(line + "\n" for line in lines))

    # ------------------------------------------------------------------ the loop
    def _batches(self):
        """Endless batches from the loader's current (epoch, position); epochs advance its order."""
        while True:
            for batch in self.loader:
                yield batch
            self.state.epoch += 1
            self.loader.set_epoch(self.state.epoch)

    def fit(self, progress=None) -> dict[str, Any]:
        """Train until the horizon, the time budget or the end of the epochs; returns a summary."""
        cfg = self.cfg
        st = self.state
        budget_s = float(cfg["max_minutes"]) * 60.0
        self.objective.train()
        batches = self._batches()
        t_segment = time.perf_counter()
        seconds_before = st.seconds
        timing_start: float | None = None
        window_loss, window_n, window_t, window_samples = 0.0, 0, time.perf_counter(), 0
        task = progress.add_task("pretraining", total=st.horizon, completed=st.step) if progress else None
        ckpt_every = max(1, int(cfg["checkpoint_every"]))
        while st.step < st.horizon:
            elapsed = seconds_before + (time.perf_counter() - t_segment)
            if budget_s > 0 and elapsed >= budget_s:
                break
            info = StepInfo(step=st.step, total_steps=st.horizon, epoch=st.epoch, generator=self.generator)
            lr = cosine_lr(st.step, st.horizon, cfg["lr"], cfg["min_lr"], min(self.warmup_steps, st.horizon // 2))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_value, logs, rep, n_samples = self._accumulate(batches, info)
            if not math.isfinite(loss_value):
                self.optimizer.zero_grad(set_to_none=True)
                st.skipped += 1
                if cfg["nan_policy"] == "stop" or st.skipped > int(cfg["max_skipped"]):
                    raise TrainingError(
                        f"the loss became {loss_value} at step {st.step} (skipped so far: {st.skipped}). "
                        f"The last good checkpoint is kept in {self.checkpoint_dir}. Try a lower [train] lr, "
                        "grad_clip = 1.0, precision = \"fp32\", or nan_policy = \"skip\"."
                    )
                continue
            if cfg["grad_clip"] and cfg["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(self.objective.parameters(), cfg["grad_clip"])
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                self.objective.after_step(info)
            st.step += 1
            st.samples += n_samples * self.world
            st.last_loss = loss_value
            window_loss += loss_value
            window_n += 1
            window_samples += n_samples * self.world
            if budget_s > 0 and not st.horizon_fixed:
                if st.step == 1:
                    timing_start = time.perf_counter()
                elif st.step == 1 + TIMING_STEPS and timing_start is not None:
                    per_step = (time.perf_counter() - timing_start) / TIMING_STEPS
                    remaining = budget_s - (seconds_before + time.perf_counter() - t_segment)
                    fit_steps = st.step + int(0.95 * remaining / max(per_step, 1e-9))
                    st.horizon = dist.min_int(max(st.step + 1, min(st.horizon, fit_steps)))
                    st.horizon_fixed = True
                    if progress:
                        progress.update(task, total=st.horizon)
            stats = self.monitor.update(rep, st.step) if rep is not None and (
                st.step % int(cfg["log_every"]) == 0 or st.step == 1) else {}
            if st.step % int(cfg["log_every"]) == 0 or st.step == st.horizon or st.step == 1:
                now = time.perf_counter()
                record = {"step": st.step, "epoch": st.epoch, "loss": dist.mean_float(window_loss / window_n),
                          "lr": lr, "samples_per_s": window_samples / max(now - window_t, 1e-9),
                          **{k: float(v) for k, v in logs.items()}, **stats}
                self._log(record)
                window_loss, window_n, window_t, window_samples = 0.0, 0, now, 0
                if progress:
                    progress.update(task, completed=st.step,
                                    description=f"pretraining loss {record['loss']:.4f} lr {lr:.2e} "
                                                f"{record['samples_per_s']:.1f} samples/s")
            st.seconds = seconds_before + (time.perf_counter() - t_segment)
            if st.step % ckpt_every == 0 and st.step < st.horizon:
                self.save()
        batches.close()  # stops the loader's prefetch thread before anything else runs
        st.seconds = seconds_before + (time.perf_counter() - t_segment)
        st.done = True
        if self.world > 1:
            self.replicas_identical = dist.replicas_identical(self.objective)
            if not self.replicas_identical:
                raise TrainingError("the DDP replicas hold different weights after training; "
                                    "an objective changes parameters outside the optimiser step")
        if st.step > 0:
            self.save()
        if progress:
            progress.update(task, completed=st.step)
        return self.summary()

    def _accumulate(self, batches, info: StepInfo) -> tuple[float, dict[str, float], torch.Tensor | None, int]:
        """Forward/backward over ``accum_steps`` micro-batches; returns the mean loss."""
        total, logs, rep, n = 0.0, {}, None, 0
        for micro in range(self.accum):
            batch = next(batches).to(self.device, non_blocking=True)
            sync = micro == self.accum - 1 or self.world == 1
            ctx = self.module.no_sync() if (not sync and hasattr(self.module, "no_sync")) else contextlib.nullcontext()
            with ctx:
                with autocast(self.device, self.precision):
                    loss, step_logs, step_rep = self.module(batch, info)
                if not torch.isfinite(loss.detach()):
                    return float(loss.detach()), {}, None, 0
                (loss / self.accum).backward()
            total += float(loss.detach())
            logs = {k: float(v) for k, v in step_logs.items()}
            rep = step_rep
            n += len(batch)
        return total / self.accum, logs, rep, n

    def summary(self) -> dict[str, Any]:
        st = self.state
        return {
            "steps": st.step,
            "epochs": st.epoch,
            "horizon": st.horizon,
            "final_loss": st.last_loss,
            "samples": st.samples,
            "seconds": round(st.seconds, 2),
            "samples_per_s": st.samples / st.seconds if st.seconds > 0 else 0.0,
            "skipped_steps": st.skipped,
            "precision": self.precision,
            "world_size": self.world,
            "replicas_identical": getattr(self, "replicas_identical", None),
            "collapse_warning": self.monitor.warned,
            **{f"final_{k}": v for k, v in self.monitor.last.items()},
        }

