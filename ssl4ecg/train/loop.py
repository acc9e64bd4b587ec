"""The one training loop every objective trains through.

It owns: the data order (a :class:`ssl4ecg.data.loader.BatchLoader`), AdamW with
parameter groups, the warm-up + cosine schedule, gradient accumulation and clipping,
bf16 autocast, the per-step objective hook (EMA updates), the collapse monitor,
``log.jsonl``, atomic checkpoints with every random state of every rank (exact resume), the
time budget and NaN handling. Under ``torchrun`` it wraps the objective in
DistributedDataParallel, gives every rank its share of each epoch and writes files from
rank 0 only.

The host never waits for the device between logging steps: losses and the objective's logs
stay tensors until a logging (or checkpoint) step reads them, and a non-finite step is
skipped *on the device* -- the fused AdamW kernel leaves weights, moments and step counts
untouched when its ``found_inf`` flag is set -- so the check costs no synchronisation. The
loop learns about a non-finite step at the next logging step: ``nan_policy = "stop"`` then
stops naming the first bad step (the weights are those before it), ``"skip"`` counts it.
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
from ssl4ecg.train.checkpoint import (
    capture_rank_state, load_checkpoint, rank_states_of, restore_rank_state, save_checkpoint,
)
from ssl4ecg.train.device import autocast
from ssl4ecg.train.monitor import CollapseMonitor
from ssl4ecg.train.optim import cosine_lr, make_optimizer

#: optimiser steps timed before a time budget fixes the schedule horizon
TIMING_STEPS = 5


def _supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """True for fused optimisers, whose kernels skip the update when ``found_inf`` is set."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in optimizer.param_groups)


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
    first_bad_step: int = -1  # the first non-finite step (as logged, 1-based); -1: none


class _DeviceCounters:
    """Per-step values summed on the device; read on the host only by :meth:`drain`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        zero = lambda: torch.zeros((), dtype=torch.float64, device=self.device)  # noqa: E731
        self.loss_sum, self.finite_steps, self.bad_steps = zero(), zero(), zero()
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.last_loss: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, bad: torch.Tensor, logged_step: int) -> None:
        """Count one optimiser step: its mean loss and whether it was skipped (both on the device)."""
        good = 1.0 - bad.double()
        self.loss_sum += torch.nan_to_num(loss.double(), nan=0.0, posinf=0.0, neginf=0.0) * good
        self.finite_steps += good
        self.bad_steps += bad.double()
        self.first_bad = torch.where((self.first_bad < 0) & (bad > 0),
                                     torch.full_like(self.first_bad, logged_step), self.first_bad)
        self.last_loss = loss

    def drain(self) -> tuple[float, int, int, float]:
        """(mean finite loss, skipped steps, first skipped step or -1, last loss) since the last drain."""
        n = float(self.finite_steps)
        mean = float(self.loss_sum) / n if n > 0 else float("nan")
        out = (mean, int(self.bad_steps), int(self.first_bad),
               float(self.last_loss) if self.last_loss is not None else float("nan"))
        self.reset()
        return out


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
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed * 1000 + 17 + dist.rank())
        # full-size draws (augmentation noise) happen where the batch is; on CPU one generator serves
        self.device_generator = self.generator if device.type == "cpu" else \
            torch.Generator(device=device).manual_seed(self.seed * 1000 + 29 + dist.rank())
        self.counters = _DeviceCounters(device)
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

    def state_dict(self, rank_states: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The checkpoint; ``rank_states`` holds every rank's random states (default: this rank's)."""
        return {
            "step": self.state.step,
            "train_state": vars(self.state).copy(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
            "ranks": rank_states if rank_states is not None else [self._rank_state()],
            "monitor": self.monitor.state_dict(),
            "world_size": self.world,
        }

    def _rank_state(self) -> dict[str, Any]:
        return capture_rank_state(self.generator, self.device_generator, self.device)

    def save(self) -> None:
        """Checkpoint (every rank's random states gathered, rank 0 writes); all ranks call this."""
        rank_states = dist.all_gather_object(self._rank_state())
        if self.rank0 and self.checkpoint_dir is not None:
            save_checkpoint(self.checkpoint_dir, self.state_dict(rank_states))
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
        restore_rank_state(rank_states_of(ckpt), dist.rank(), self.generator, self.device_generator,
                           self.device, fallback_seed=(self.seed, int(ckpt["step"])))
        self.state = TrainState(**{**vars(TrainState()), **ckpt["train_state"]})
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
        log_every = int(cfg["log_every"])
        self.objective.train()
        batches = self._batches()
        t_segment = time.perf_counter()
        seconds_before = st.seconds
        timing_start: float | None = None
        window_t, window_samples = time.perf_counter(), 0
        task = progress.add_task("pretraining", total=st.horizon, completed=st.step) if progress else None
        ckpt_every = max(1, int(cfg["checkpoint_every"]))
        self.counters.reset()
        try:
            while st.step < st.horizon:
                elapsed = seconds_before + (time.perf_counter() - t_segment)
                if budget_s > 0 and elapsed >= budget_s:
                    break
                info = StepInfo(step=st.step, total_steps=st.horizon, epoch=st.epoch, generator=self.generator,
                                device_generator=self.device_generator)
                lr = cosine_lr(st.step, st.horizon, cfg["lr"], cfg["min_lr"],
                               min(self.warmup_steps, st.horizon // 2))
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss, logs, rep, n_samples = self._accumulate(batches, info)
                self._optimizer_step(loss, st.step + 1)
                with torch.no_grad():
                    self.objective.after_step(info)
                st.step += 1
                st.samples += n_samples * self.world
                window_samples += n_samples * self.world
                if budget_s > 0 and not st.horizon_fixed:
                    if st.step == 1:
                        timing_start = self._synchronized_clock()
                    elif st.step == 1 + TIMING_STEPS and timing_start is not None:
                        per_step = (self._synchronized_clock() - timing_start) / TIMING_STEPS
                        remaining = budget_s - (seconds_before + time.perf_counter() - t_segment)
                        fit_steps = st.step + int(0.95 * remaining / max(per_step, 1e-9))
                        st.horizon = dist.min_int(max(st.step + 1, min(st.horizon, fit_steps)))
                        st.horizon_fixed = True
                        if progress:
                            progress.update(task, total=st.horizon)
                at_log = st.step % log_every == 0 or st.step == st.horizon or st.step == 1
                at_checkpoint = st.step % ckpt_every == 0 and st.step < st.horizon
                if at_log or at_checkpoint:  # the only places the host reads device values
                    now = time.perf_counter()
                    mean_loss = self._drain(st)
                    if at_log:
                        stats = self.monitor.update(rep, st.step) if rep is not None else {}
                        record = {"step": st.step, "epoch": st.epoch, "loss": dist.mean_float(mean_loss),
                                  "lr": lr, "samples_per_s": window_samples / max(now - window_t, 1e-9),
                                  **{k: float(v) for k, v in logs.items()}, **stats}
                        self._log(record)
                        window_t, window_samples = now, 0
                        if progress:
                            progress.update(task, completed=st.step,
                                            description=f"pretraining loss {record['loss']:.4f} lr {lr:.2e} "
                                                        f"{record['samples_per_s']:.1f} samples/s")
                st.seconds = seconds_before + (time.perf_counter() - t_segment)
                if at_checkpoint:
                    self.save()
            self._drain(st)
        finally:
            batches.close()  # stops the loader's workers before anything else runs
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

    def _synchronized_clock(self) -> float:
        """Wall time after the device has finished its queued work (timing the budget's first steps)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _accumulate(self, batches, info: StepInfo) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor | None, int]:
        """Forward/backward over ``accum_steps`` micro-batches; the mean loss stays on the device."""
        total: torch.Tensor | None = None
        logs, rep, n = {}, None, 0
        for micro in range(self.accum):
            batch = next(batches).to(self.device, non_blocking=True)
            sync = micro == self.accum - 1 or self.world == 1
            ctx = self.module.no_sync() if (not sync and hasattr(self.module, "no_sync")) else contextlib.nullcontext()
            with ctx:
                with autocast(self.device, self.precision):
                    loss, step_logs, step_rep = self.module(batch, info)
                (loss / self.accum).backward()
            loss = loss.detach().float()
            total = loss if total is None else total + loss
            logs = dict(step_logs)
            rep = step_rep
            n += len(batch)
        return total / self.accum, logs, rep, n

    def _optimizer_step(self, loss: torch.Tensor, logged_step: int) -> None:
        """Clip and step, skipping the update on the device when the loss or gradients are not finite."""
        bad = ~torch.isfinite(loss)
        if self.cfg["grad_clip"] and self.cfg["grad_clip"] > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.cfg["grad_clip"])
            bad = bad | ~torch.isfinite(norm.to(bad.device))
        found_inf = bad.float()
        if self.world > 1:  # one rank's bad loss skips the step on every rank (replicas stay equal)
            found_inf = dist.all_reduce_max(found_inf)
        if _supports_found_inf(self.optimizer):
            self.optimizer.found_inf = found_inf
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not bool(found_inf):  # the foreach fallback cannot skip on the device: one sync per step
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.counters.add(loss, found_inf, logged_step)

    def _drain(self, st: TrainState) -> float:
        """Read the device counters (one host sync), apply the NaN policy; the window's mean loss."""
        mean_loss, bad, first_bad, last_loss = self.counters.drain()
        if math.isfinite(last_loss):
            st.last_loss = last_loss
        if bad:
            st.skipped += bad
            if st.first_bad_step < 0:
                st.first_bad_step = first_bad
            if self.cfg["nan_policy"] == "stop" or st.skipped > int(self.cfg["max_skipped"]):
                raise TrainingError(self._nan_message(first_bad, bad))
        return mean_loss

    def _nan_message(self, first_bad: int, bad: int) -> str:
        """Why training stopped, where the last checkpoint is, and a remedy that works."""
        from ssl4ecg.train.checkpoint import checkpoint_step

        found = checkpoint_step(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        where = (f"The last checkpoint ({self.checkpoint_dir / found[0]}) holds step {found[1]}."
                 if found else "No checkpoint was written before it.")
        policy = self.cfg["nan_policy"]
        head = (f"the loss or its gradients became non-finite at step {first_bad}"
                if policy == "stop" else
                f"{self.state.skipped} non-finite steps were skipped (more than max_skipped = "
                f"{self.cfg['max_skipped']}; the first at step {self.state.first_bad_step})")
        return (f"{head}; that update was not applied. {where} Start the run again with a lower learning rate "
                f"(--set train.lr=...), --set train.grad_clip=1.0, --set train.precision=fp32, or "
                f"--set train.nan_policy=skip to skip such steps. If the data may be damaged, check a cache with "
                f"`ssl4ecg data info CACHE --verify`.")

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

