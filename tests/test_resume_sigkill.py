"""A run killed with SIGKILL mid-epoch and resumed ends with the same weights as one never killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml")
TINY = [
    "--set", "data.n_records=120", "--set", "data.sampling_rate=100.0",
    "--set", "encoder.dim=32", "--set", "encoder.depth=2", "--set", "encoder.heads=2",
    "--set", "encoder.drop_path=0.1",  # uses the global RNG: must be restored too
    "--set", "objective.predictor_dim=16", "--set", "objective.predictor_depth=1",
    "--set", "objective.predictor_heads=2", "--set", "train.batch_size=8", "--set", "train.epochs=3",
    "--set", "train.max_minutes=0.0", "--set", "train.precision='fp32'", "--set", "train.checkpoint_every=3",
    "--set", "train.log_every=1", "--set", "train.num_threads=1", "--set", "eval.0.epochs=2",
]


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ssl4ecg", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path):
    straight = tmp_path / "straight"
    done = subprocess.run(_cmd("run", RECIPE, *TINY, "--out", str(straight)), capture_output=True, text=True,
                          env=_env(), timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd("run", RECIPE, *TINY, "--out", str(killed)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env())
    log = killed / "log.jsonl"
    deadline = time.time() + 300
    # wait until a checkpoint exists and training is past it, in the middle of an epoch
    while time.time() < deadline:
        if log.exists() and (killed / "checkpoints" / "last.pt").exists():
            steps = [json.loads(x)["step"] for x in log.read_text().splitlines() if x.strip()]
            if steps and steps[-1] >= 7:
                break
        if proc.poll() is not None:
            pytest.fail("the run finished before it could be killed; make it longer")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (killed / "metrics.json").exists() or "linear_probe" not in (killed / "metrics.json").read_text()

    resumed = subprocess.run(_cmd("run", "--resume", str(killed)), capture_output=True, text=True, env=_env(),
                             timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(killed / "checkpoints" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] > 7
    for name, tensor in a["objective"].items():  # student, EMA teacher and predictor
        assert torch.equal(tensor, b["objective"][name]), name
    steps = [json.loads(x)["step"] for x in (killed / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, a["step"] + 1))  # no duplicated or missing log lines
    ma = json.loads((straight / "metrics.json").read_text())["eval"]["linear_probe"]
    mb = json.loads((killed / "metrics.json").read_text())["eval"]["linear_probe"]
    assert ma["auc_macro"] == mb["auc_macro"]
